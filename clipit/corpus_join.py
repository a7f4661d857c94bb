"""`clipit prepare reports`: TCGA-Reports joined with its cancer types into the `id,text,project` csv the
paper configs read (`reports.path: data/tcga/reports.csv`), once, before pairing.

    clipit prepare reports --csv TCGA_Reports.csv --project-map tcga_patient_to_cancer_type.csv \
        --out data/tcga/reports.csv

Both inputs are read by clipit/corpus_reader.py exactly as a config's `reports.path` / `reports.project_map`
would read them (ids, blank texts, encodings, duplicate ids); a report whose patient has no cancer type
keeps an empty project (counted in the summary line).
"""

from __future__ import annotations

import csv
from pathlib import Path

from clipit.corpus import CorpusError
from clipit.corpus_reader import load_reports
from clipit.io import atomic_path

COLUMNS = ("id", "text", "project")


def join_reports(
    reports_csv: str | Path, project_map: str | Path, out: str | Path, overwrite: bool = False, encoding: str = "utf-8"
) -> dict:
    """Write `out` (columns id,text,project) from a report csv and a patient -> cancer type map; returns counts."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise CorpusError(f"{out}: exists already; give another --out, or --overwrite to replace it")
    reports = load_reports(reports_csv, fmt="csv", project_map=project_map, encoding=encoding)
    with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for r in reports:
            writer.writerow([r.id, r.text, r.project or ""])
    projects: dict[str, int] = {}
    for r in reports:
        projects[r.project or ""] = projects.get(r.project or "", 0) + 1
    return {"reports": len(reports), "unmapped": projects.pop("", 0), "projects": projects, "out": str(out)}
