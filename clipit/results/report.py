"""`clipit report RUNS_DIR`: aggregate finished runs into the paper's tables and figures.

Every directory under RUNS_DIR that holds a metrics.json is a run (symlinked warm starts are not
followed, so a reused unimodal probe counts once). Its labels come from the grid ledger
(`state.json`: the cell's axes) when present, otherwise from its config.yaml (model.backbone,
data.name) and its path (`runs/<method>/seed-<n>`). Writes into `--out` (default RUNS_DIR/report):

    report.md        Table 1 (unimodal vs CLIP-IT per backbone x dataset, mean ± std over seeds, Δ),
                     ablations, Ω, grid status, figure links
    table1.csv, ablations.csv, omega.csv, multimodal.csv, lora_search.csv, runs.csv  (fractions in
                     percent, columns `*_pct`; a table without rows is a file with its header only)
    pareto.png       accuracy vs parameter count per dataset (with the Pareto frontier)
    omega.png        Ω x 100 per dataset and backbone
    curves-<dataset>.png   training loss and validation balanced accuracy from the TensorBoard files

A run whose metrics.json, state.json or config.yaml exists but cannot be read, or an Ω seed whose
predictions cannot, is left out with a warning naming the file (stderr, and report.md's "Left out"
section); a folder without runs gives an empty report that says so.

Ω (method.md §2) = fraction of test samples the text-only model (method kind `text`, fed the test
image's retrieved report) gets right and the unimodal vision model gets wrong. Predictions are
matched by sample key, seed by seed (text run of the same dataset and seed; the text model does
not depend on the backbone).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from clipit import layout
from clipit.errors import ClipitError, output_setting
from clipit.io import atomic_write_text, make_dirs
from clipit.methods import role_method
from clipit.results import plots as P
from clipit.results.runs import find_runs
from clipit.results.tables import (
    ablation_table,
    lora_table,
    markdown_table,
    multimodal_table,
    omega_table,
    run_records,
    status_lines,
    table1,
    text_table,
    write_csv,
)


class ReportError(ClipitError):
    """The runs folder given to `clipit report` cannot be read."""


def warn_on_stderr(message: str) -> None:
    print(f"clipit: warning: {message}", file=sys.stderr, flush=True)


def build_report(
    root: str | Path,
    out: str | Path | None = None,
    metric: str = "balanced_accuracy",
    plots: bool = True,
    warn: Callable[[str], None] = warn_on_stderr,
) -> dict:
    """Write the report files; returns {"runs": n, "files": [...], "table1": records, "warnings": [...], ...}.

    Whatever is left out (a run with broken files, an Ω seed without readable predictions) goes to
    `warn` (one line each, on stderr by default) and into report.md's "Left out" section; a folder
    without runs gives an empty report that says so."""
    root = Path(root)
    if not root.is_dir():
        raise ReportError(f"{root}: no such directory; give the folder that holds the runs (e.g. runs/grids/NAME)")
    out = Path(out) if out else root / "report"
    with output_setting("give `clipit report` another --out folder"):  # advice of a full disk
        return _write_report(root, out, metric, plots, warn)


def _write_report(root: Path, out: Path, metric: str, plots: bool, warn: Callable[[str], None]) -> dict:
    make_dirs(out)
    left_out: list[str] = []

    def note(message: str) -> None:
        left_out.append(message)
        warn(message)

    runs, states = find_runs(root, note)
    if not runs:
        warn(f"{root}: no finished runs found (no readable {layout.METRICS} below it); the report is empty")
    h1, r1, rec1 = table1(runs, metric)
    ha, ra, reca = ablation_table(runs, metric)
    ho, ro, reco = omega_table(runs, note)
    hm, rm, recm = multimodal_table(runs, metric)
    hl, rl, recl = lora_table(runs, metric)
    files = []
    for name, records, empty_header in (
        (
            "table1.csv",
            rec1,
            ["backbone", "dataset"]
            + [f"{role_method(r)}_{k}" for r in ("probe", "proposed") for k in ("mean", "std", "n")]
            + ["delta"],
        ),
        (
            "ablations.csv",
            reca,
            [
                "backbone",
                "dataset",
                "variant",
                "label",
                "method",
                "kind",
                "mean",
                "std",
                "n",
                "compared_to",
                "delta_unimodal",
                "delta_clipit",
            ],
        ),
        ("omega.csv", reco, ["backbone", "dataset", "omega_mean", "omega_std", "n_seeds", "seeds", "matched"]),
        ("multimodal.csv", recm, ["dataset", "model", "kind", "mean", "std", "n", "params_inference"]),
        (
            "lora_search.csv",
            recl,
            ["backbone", "dataset", "chosen", "label", "settings", "val_mean", "mean", "std", "n", "table1_mean"],
        ),
        (
            "runs.csv",
            run_records(runs),
            [
                "backbone",
                "dataset",
                "variant",
                "method",
                "kind",
                "seed",
                "balanced_accuracy",
                "accuracy",
                "params_total",
                "params_trainable",
                "run_dir",
            ],
        ),
    ):
        write_csv(out / name, records, empty_header)
        files.append(out / name)
    figures = []
    if plots and runs:
        figures += P.pareto(runs, metric, out / "pareto.png")
        if reco:
            figures += P.omega_bars(reco, out / "omega.png")
        figures += P.training_curves(runs, out)
    files += figures
    metric_name = "balanced accuracy" if metric == "balanced_accuracy" else metric
    md = [
        f"# CLIP-IT results: {root}",
        "",
        f"{len(runs)} finished runs. Numbers are test {metric_name} in %, mean ± std over seeds (std with ddof=1); "
        "Δ is CLIP-IT minus unimodal in points.",
        "",
    ]
    if not runs:
        md += [f"No finished runs were found under {root} (a run is a folder with a readable {layout.METRICS}).", ""]
    if left_out:
        md += ["## Left out", ""] + [f"- {m}" for m in left_out] + [""]
    md += ["## Table 1: unimodal vs CLIP-IT", "", markdown_table(h1, r1) if r1 else "(no unimodal/CLIP-IT runs)", ""]
    if rm:
        md += [
            "## Multimodal and CLIP-based baselines",
            "",
            "These need more than the vision model at test time (the retrieved report, or a CLIP's towers); "
            "their parameters at inference include what runs for it.",
            "",
            markdown_table(hm, rm),
            "",
        ]
    if ra:
        md += [
            "## Ablations",
            "",
            "Δ vs the run it varies: the grid's `compare_to` row, else CLIP-IT (full).",
            "",
            markdown_table(ha, ra),
            "",
        ]
    if rl:
        md += [
            "## LoRA search",
            "",
            "Chosen per backbone and dataset by the mean validation balanced accuracy of "
            "the selected checkpoints; the test column is the chosen setting's.",
            "",
            markdown_table(hl, rl),
            "",
        ]
    md += ["## Ω: text right, vision wrong", ""]
    texts = text_table(runs, metric)
    if texts:
        md += [
            "Text-only model (the paired report's embedding -> MLP; test images use their retrieved report):",
            "",
            markdown_table(["Dataset", "Seeds", metric_name], texts),
            "",
        ]
    md += [
        markdown_table(ho, ro)
        if ro
        else "(needs text-only runs, method kind `text`, next to the unimodal runs of the same dataset and seed)",
        "",
    ]
    status = status_lines(states)
    if status:
        md += ["## Grid status", ""] + status + [""]
    if figures:
        md += ["## Figures", ""] + [f"![{f.stem}]({f.name})" for f in figures] + [""]
    atomic_write_text(out / "report.md", "\n".join(md))
    files.insert(0, out / "report.md")
    return {
        "runs": len(runs),
        "files": [str(f) for f in files],
        "table1": rec1,
        "ablations": reca,
        "omega": reco,
        "multimodal": recm,
        "lora": recl,
        "markdown": "\n".join(md),
        "warnings": left_out,
    }
