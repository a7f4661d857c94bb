"""`clipit report RUNS_DIR`: aggregate finished runs into the paper's tables and figures.

Every directory under RUNS_DIR that holds a metrics.json is a run (symlinked warm starts are not
followed, so a reused unimodal probe counts once). Its labels come from the grid ledger
(`state.json`: the cell's axes) when present, otherwise from its config.yaml (model.backbone,
data.name) and its path (`runs/<method>/seed-<n>`). Writes into `--out` (default RUNS_DIR/report):

    report.md        Table 1 (unimodal vs CLIP-IT per backbone x dataset, mean ± std over seeds, Δ), the
                     paired gain over the warm start with a bootstrap interval, our cells beside the
                     published ones (paper, authors' README, eva) with flags, ablations, Ω, grid status
    table1.csv, gains.csv, comparison.csv, ablations.csv, omega.csv, multimodal.csv, lora_search.csv,
                     runs.csv  (fractions in percent, columns `*_pct`; a table without rows is a file
                     with its header only; a single seed's std is an empty cell)
    frozen.csv       k-NN and SimpleShot on each backbone's frozen features (runs with a frozen_eval.json,
                     written by `clipit evaluate --frozen`)
    table1.tex, gains.tex, comparison.tex, ablations.tex, frozen.tex   the tables for a paper (booktabs),
                     each with provenance footnotes (clipit/results/provenance_notes.py; report.md too)
    pareto.{png,pdf,svg}   accuracy vs parameter count per dataset (Pareto frontier); the vision models
                     in the top row, every model (multimodal hollow) below
    omega.{png,pdf,svg}    Ω x 100 per dataset and backbone
    curves-<dataset>.{png,pdf,svg}   training loss and validation balanced accuracy (TensorBoard files);
                     warm-started runs continue after their warm start; curves-<dataset>-<backbone>-
                     ablations.* draws every ablation variant

The published numbers are package data (clipit/results/reference_data/, clipit/results/references.py);
`--references FILE.csv` adds rows, `--tolerance POINTS` (default 2) sets how far ours may be from one
before the cell is flagged.

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
from clipit.results import plots as P
from clipit.results.comparison import comparison_table, gains_table, source_lines
from clipit.results.curves import training_curves
from clipit.results.frozen_table import frozen_table
from clipit.results.multimodal_tables import multimodal_table, omega_table, text_table
from clipit.results.provenance_notes import runs_notes, table1_runs
from clipit.results.references import DEFAULT_TOLERANCE, load_references
from clipit.results.runs import find_runs
from clipit.results.table_files import run_records, write_csvs, write_latex
from clipit.results.tables import markdown_table, status_lines, table1
from clipit.results.variant_tables import ablation_table, lora_table


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
    tolerance: float = DEFAULT_TOLERANCE,
    references: list[str | Path] = (),
) -> dict:
    """Write the report files; returns {"runs": n, "files": [...], "table1": records, "warnings": [...], ...}.

    Whatever is left out (a run with broken files, an Ω seed without readable predictions) goes to
    `warn` (one line each, on stderr by default) and into report.md's "Left out" section; a folder
    without runs gives an empty report that says so."""
    root = Path(root)
    if not root.is_dir():
        raise ReportError(f"{root}: no such directory; give the folder that holds the runs (e.g. runs/grids/NAME)")
    if not tolerance >= 0:
        raise ReportError(f"--tolerance {tolerance}: give a non-negative number of percentage points (e.g. 2)")
    refs = load_references(list(references))  # a broken reference file stops before anything is written
    out = Path(out) if out else root / "report"
    with output_setting("give `clipit report` another --out folder"):  # advice of a full disk
        return _write_report(root, out, metric, plots, warn, refs, tolerance)


def _write_report(
    root: Path, out: Path, metric: str, plots: bool, warn: Callable[[str], None], refs: list, tolerance: float
) -> dict:
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
    hg, rg, recg = gains_table(runs, metric, refs)
    hc, rc, recc = comparison_table(runs, refs, metric, tolerance)
    hf, rf, recf = frozen_table(runs, note)
    files = write_csvs(
        out,
        {
            "table1.csv": rec1,
            "ablations.csv": reca,
            "gains.csv": recg,
            "frozen.csv": recf,
            "comparison.csv": recc,
            "omega.csv": reco,
            "multimodal.csv": recm,
            "lora_search.csv": recl,
            "runs.csv": run_records(runs),
        },
    )
    mean_rows = {i for i, row in enumerate(r1) if row[0].startswith("Mean gain")}
    # footnotes: what the runs of each table ran on, and which runs differ (clipit/results/provenance_notes.py)
    notes1, notes_all = runs_notes(table1_runs(runs)), runs_notes(runs)
    files += write_latex(
        out,
        {
            "table1.tex": (
                h1,
                r1,
                f"Test {metric.replace('_', ' ')} (%), mean ± std over seeds; Δ: CLIP-IT minus unimodal.",
                mean_rows,
                notes1,
            ),
            "gains.tex": (
                hg,
                rg,
                "Paired gain of CLIP-IT over its warm start (same seed), points, with a bootstrap interval over seeds.",
                {i for i, row in enumerate(rg) if row[1].startswith("Mean over")},
                notes1,
            ),
            "comparison.tex": (
                hc,
                rc,
                f"Ours beside published numbers; flagged beyond ±{tolerance:g} points.",
                set(),
                notes1,
            ),
            "ablations.tex": (ha, ra, "Ablations: Δ vs unimodal and vs the run each one varies.", set(), notes_all),
            "frozen.tex": (
                hf,
                rf,
                "Frozen features: k-NN (cosine, k=20) and SimpleShot balanced accuracy (%), mean ± std over seeds.",
                set(),
                notes_all,
            ),
        },
    )
    figures = []
    if plots and runs:
        figures += P.pareto(runs, metric, out / "pareto.png")
        if reco:
            figures += P.omega_bars(reco, out / "omega.png")
        figures += training_curves(runs, out)
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
    md += [f"<sub>{n}</sub>  " for n in notes1] + ([""] if notes1 else [])
    md += [
        "## Gain over the warm start (paired by seed)",
        "",
        "CLIP-IT minus the unimodal probe it warm-starts from, seed by seed (seeds with both runs); the interval is "
        "a percentile bootstrap over seeds (10,000 resamples, fixed seed). The mean row averages the backbones that "
        "have a pair. 'within seed noise': the interval holds 0."
        + (
            " A `<source> gain` column is that source's CLIP-IT minus unimodal for the same cell; in the mean row, "
            "its mean over the same backbones."
            if any(h.endswith(" gain") for h in hg)
            else ""
        ),
        "",
        markdown_table(hg, rg) if rg else "(no backbone and dataset with a unimodal and a CLIP-IT run of one seed)",
        "",
        "## Against published numbers",
        "",
        f"Δ = ours minus the reference, in points; a cell further than ±{tolerance:g} points from a reference is "
        "flagged in the last column (`clipit report --tolerance`). Sources:",
        "",
        *source_lines(refs),
        "",
        markdown_table(hc, rc) if rc else "(no run matches a reference cell: dataset, backbone, method and variant)",
        "",
    ]
    if rf:
        md += [
            "## Frozen features: k-NN and few-shot",
            "",
            "Each run's backbone with no head (`clipit evaluate --frozen`): k-NN (cosine, k=20) and SimpleShot "
            "(support drawn from train, mean over 100 episodes) on the test split, balanced accuracy in %.",
            "",
            markdown_table(hf, rf),
            "",
        ]
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
    if notes_all:
        md += ["## Provenance", "", "Every run of this report (each run folder's provenance.json):", ""]
        md += [f"- {n}" for n in notes_all] + [""]
    status = status_lines(states)
    if status:
        md += ["## Grid status", ""] + status + [""]
    if figures:
        md += ["## Figures", "", "Each also as PDF and SVG beside the PNG.", ""]
        md += [f"![{f.stem}]({f.name})" for f in figures if f.suffix == ".png"] + [""]
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
        "gains": recg,
        "comparison": recc,
        "frozen": recf,
        "markdown": "\n".join(md),
        "warnings": left_out,
        "provenance": notes_all,
    }
