"""The report's table files: each table as CSV (write_csv: percent columns, empty cells for missing values)
and as LaTeX (booktabs), written atomically into the report folder; the records of runs.csv (run_records)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from clipit.io import atomic_write_text
from clipit.methods import role_method
from clipit.results.latex import latex_table
from clipit.results.runs import Run


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


# record keys that hold a fraction of samples: the CSVs give them in percent, named with the unit
PERCENT_KEYS = (
    "mean",
    "std",
    "delta",
    "val_mean",
    "table1_mean",
    "balanced_accuracy",
    "accuracy",
    "omega_std",
    "gain_ci_low",
    "gain_ci_high",
)


def _is_percent(key: str) -> bool:
    return key in PERCENT_KEYS or key.endswith(("_mean", "_std")) or key.startswith("delta")


def write_csv(path: Path, records: list[dict], fields: list[str] | None = None) -> None:
    """Records as CSV: fractions in percent (column suffix `_pct`), empty cells for missing values; no
    records gives a file with the header only (`fields`)."""
    names = list(dict.fromkeys(k for r in records for k in r)) if records else list(fields or [])
    if not names:
        raise ValueError(f"{path}: no records and no column names")
    column = {k: f"{k}_pct" if _is_percent(k) and not k.endswith("_n") else k for k in names}
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=[column[k] for k in names])
    writer.writeheader()
    for r in records:
        writer.writerow(
            {
                column[k]: (
                    ""
                    if v is None
                    else 100 * v
                    if _is_percent(k) and isinstance(v, (int, float)) and not isinstance(v, bool)
                    else v
                )
                for k, v in r.items()
            }
        )
    atomic_write_text(path, buf.getvalue())


def run_records(runs: list[Run]) -> list[dict]:
    return [
        {
            "backbone": r.backbone,
            "dataset": r.dataset,
            "variant": r.variant,
            "method": r.method,
            "kind": r.kind,
            "seed": r.seed,
            "balanced_accuracy": r.metrics.get("balanced_accuracy"),
            "accuracy": r.metrics.get("accuracy"),
            "params_total": r.params,
            "params_trainable": (r.metrics.get("parameters") or {}).get("trainable"),
            "run_dir": str(r.path),
        }
        for r in sorted(runs, key=lambda r: (r.dataset, r.backbone, r.variant, r.method, r.seed))
    ]
