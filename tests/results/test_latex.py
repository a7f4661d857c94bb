"""LaTeX output of `clipit report` (clipit/results/latex.py): booktabs rules, escaped special characters,
footnotes."""

from clipit.results.latex import escape, latex_table


def test_special_characters_are_escaped():
    assert escape("word_drop 30% & #1 {x} $5") == r"word\_drop 30\% \& \#1 \{x\} \$5"
    assert escape("94.2 ± 0.1, Δ, Ω × 100, a–b") == r"94.2 $\pm$ 0.1, $\Delta$, $\Omega$ $\times$ 100, a--b"
    assert escape(r"C:\runs ~ ^") == r"C:\textbackslash{}runs \textasciitilde{} \textasciicircum{}"


def test_a_booktabs_table_is_well_formed():
    tex = latex_table(
        ["Run_name", "Score"],
        [["late_fusion", "50%"], ["mean", "1"]],
        caption="Δ of run_a",
        label="tab:x",
        rule_before={1},
        notes=["seed_0 only"],
    )
    lines = tex.splitlines()
    assert lines[:5] == [r"\begin{table}[t]", r"\centering", r"\small", r"\begin{tabular}{lr}", r"\toprule"]
    assert lines[5:11] == [
        r"Run\_name & Score \\",
        r"\midrule",
        r"late\_fusion & 50\% \\",
        r"\midrule",
        r"mean & 1 \\",
        r"\bottomrule",
    ]
    assert r"\footnotesize seed\_0 only" in tex and r"\caption{$\Delta$ of run\_a}" in tex
    assert tex.endswith("\\label{tab:x}\n\\end{table}\n")
    # a short row is padded: every row has the header's columns
    assert latex_table(["a", "b", "c"], [["x"]], "c", "l").count(r"x &  &  \\") == 1
