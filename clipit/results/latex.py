"""The report's tables as LaTeX (booktabs: \\toprule, \\midrule, \\bottomrule; needs \\usepackage{booktabs})."""

from __future__ import annotations

import re

# LaTeX's special characters, and the report's non-ASCII symbols as math (works without unicode fonts)
_ESCAPES = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "±": r"$\pm$",
    "Δ": r"$\Delta$",
    "Ω": r"$\Omega$",
    "×": r"$\times$",
    "→": r"$\rightarrow$",
    "λ": r"$\lambda$",
    "–": "--",
    "≥": r"$\geq$",
}
_SPECIAL = re.compile("|".join(re.escape(c) for c in _ESCAPES))


def escape(text: str) -> str:
    """`text` with LaTeX's special characters escaped (an underscore in a run name stays an underscore)."""
    return _SPECIAL.sub(lambda m: _ESCAPES[m.group(0)], str(text))


def latex_table(
    header: list[str],
    rows: list[list[str]],
    caption: str,
    label: str,
    rule_before: set[int] = frozenset(),
    notes: list[str] = (),
) -> str:
    """A booktabs table: the first column left-aligned, the others right; \\midrule before the rows whose
    index is in `rule_before` (e.g. a mean row); `notes` as footnote-sized lines under the tabular."""
    width = len(header)
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        r"\small",
        r"\begin{tabular}{l" + "r" * (width - 1) + "}",
        r"\toprule",
        " & ".join(escape(h) for h in header) + r" \\",
        r"\midrule",
    ]
    for i, row in enumerate(rows):
        if i in rule_before:
            lines.append(r"\midrule")
        cells = list(row) + [""] * (width - len(row))
        lines.append(" & ".join(escape(c) for c in cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    for note in notes:
        lines.append(r"\par\footnotesize " + escape(note))
    lines += [rf"\caption{{{escape(caption)}}}", rf"\label{{{label}}}", r"\end{table}", ""]
    return "\n".join(lines)
