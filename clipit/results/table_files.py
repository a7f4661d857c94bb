"""The report's table files: each table as CSV (write_csv: percent columns, empty cells for missing values)
and as LaTeX (booktabs), written atomically into the report folder."""

from __future__ import annotations

from pathlib import Path

from clipit.io import atomic_write_text
from clipit.methods import role_method
from clipit.results.latex import latex_table
from clipit.results.tables import write_csv


def empty_headers() -> dict[str, list[str]]:
    """Each CSV's columns when it has no rows (a table without rows is a file with its header only)."""
    roles = [f"{role_method(r)}_{k}" for r in ("probe", "proposed") for k in ("mean", "std", "n")]
    return {
        "table1.csv": ["backbone", "dataset", *roles, "delta"],
        "ablations.csv": "backbone dataset variant label method kind mean std n compared_to delta_unimodal "
        "delta_clipit".split(),
        "gains.csv": "dataset backbone seeds n gain_mean gain_std gain_ci_low gain_ci_high verdict".split(),
        "frozen.csv": "dataset backbone kind n knn_mean knn_std".split(),
        "comparison.csv": "dataset backbone method variant mean std n outside_tolerance".split(),
        "omega.csv": "backbone dataset omega_mean omega_std n_seeds seeds matched".split(),
        "multimodal.csv": "dataset model kind mean std n params_inference".split(),
        "lora_search.csv": "backbone dataset chosen label settings val_mean mean std n table1_mean".split(),
        "runs.csv": "backbone dataset variant method kind seed balanced_accuracy accuracy params_total "
        "params_trainable run_dir".split(),
    }


def write_csvs(out: Path, tables: dict[str, list[dict]]) -> list[Path]:
    headers = empty_headers()
    for name, records in tables.items():
        write_csv(out / name, records, headers[name])
    return [out / name for name in tables]


def write_latex(out: Path, tables: dict[str, tuple]) -> list[Path]:
    """{file name: (header, rows, caption, indices of rows with a rule above[, footnotes])} as LaTeX tables."""
    for name, (header, rows, caption, rules, *notes) in tables.items():
        label = f"tab:{name.removesuffix('.tex')}"
        atomic_write_text(out / name, latex_table(header, rows, caption, label, rules, notes[0] if notes else ()))
    return [out / name for name in tables]
