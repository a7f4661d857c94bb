"""Published numbers to compare runs with, shipped as data (clipit/results/reference_data/*.csv).

Each row is one cell, keyed like a run: (dataset, backbone, method, variant) with the names of
clipit/results/runs.py ("" = the main runs; an ablation's grid value, e.g. `no-lora`), the value in
percent (balanced accuracy), and where it comes from: `source` (the column it gets in the report,
e.g. paper-v2, code-readme, eva) and `version` (the exact document or file and commit). Shipped:

    paper.csv   CLIP-IT arXiv:2504.16181v2 Table 1 and its ablation prose (UNI on PCAM); the authors'
                README table (mean ± std over 3 runs) at a pinned commit
    eva.csv     kaiko-ai/eva's pathology leaderboard (frozen-backbone linear probe) for our backbones,
                eva's model names mapped to ours in each row's note

`clipit report --references FILE.csv` adds rows in the same columns.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from clipit.errors import ClipitError

COLUMNS = ("source", "version", "dataset", "backbone", "method", "variant", "value_pct", "std_pct", "n_seeds", "note")
SHIPPED = ("paper.csv", "eva.csv")
DEFAULT_TOLERANCE = 2.0  # percentage points: a cell further than this from a reference is flagged


class ReferenceFileError(ClipitError):
    """A reference CSV cannot be used; the message names the file, the row and the column."""


@dataclass(frozen=True)
class Reference:
    source: str
    version: str
    dataset: str
    backbone: str
    method: str
    variant: str
    value: float  # fraction, like the runs' metrics
    std: float | None
    note: str

    @property
    def cell(self) -> tuple[str, str, str, str]:
        return (self.dataset, self.backbone, self.method, self.variant)


def _number(text: str, where: str, optional: bool) -> float | None:
    if not text.strip():
        if optional:
            return None
        raise ReferenceFileError(f"{where} is empty; give the value in percent (e.g. 94.24)")
    try:
        value = float(text)
    except ValueError:
        raise ReferenceFileError(f"{where} is {text!r}, not a number; give it in percent (e.g. 94.24)") from None
    if not math.isfinite(value) or not 0 <= value <= 100:
        raise ReferenceFileError(f"{where} is {text!r}; give a percentage between 0 and 100")
    return value


def parse_references(text: str, name: str) -> list[Reference]:
    """The rows of one reference CSV (`name` labels errors: the file)."""
    reader = csv.DictReader(text.splitlines())
    missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise ReferenceFileError(f"{name}: no column(s) {', '.join(missing)}; the header must be {','.join(COLUMNS)}")
    refs = []
    for line, row in enumerate(reader, start=2):
        where = f"{name} line {line}"
        for key in ("source", "version", "dataset", "backbone", "method"):
            if not (row.get(key) or "").strip():
                raise ReferenceFileError(f"{where}: {key} is empty; every row names its {key}")
        value = _number(row["value_pct"] or "", f"{where}: value_pct", optional=False)
        std = _number(row["std_pct"] or "", f"{where}: std_pct", optional=True)
        refs.append(
            Reference(
                row["source"].strip(),
                row["version"].strip(),
                row["dataset"].strip(),
                row["backbone"].strip(),
                row["method"].strip(),
                (row["variant"] or "").strip(),
                value / 100,
                None if std is None else std / 100,
                (row["note"] or "").strip(),
            )
        )
    seen: dict[tuple, int] = {}
    for ref in refs:
        key = (ref.source, *ref.cell)
        seen[key] = seen.get(key, 0) + 1
    twice = [k for k, n in seen.items() if n > 1]
    if twice:
        raise ReferenceFileError(
            f"{name}: {len(twice)} cell(s) given twice for one source, e.g. {twice[0]}; keep one row per source and cell"
        )
    return refs


def shipped_references() -> list[Reference]:
    """The references in clipit's package data."""
    folder = resources.files("clipit.results") / "reference_data"
    return [r for f in SHIPPED for r in parse_references(folder.joinpath(f).read_text(encoding="utf-8"), f)]


def load_references(extra: list[str | Path] = ()) -> list[Reference]:
    """The shipped references plus the rows of each file in `extra` (a source and cell given twice is an
    error: which number would be compared?)."""
    refs = shipped_references()
    for path in extra:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ReferenceFileError(f"{path}: no such file; give a CSV with columns {','.join(COLUMNS)}") from None
        except (OSError, UnicodeDecodeError) as err:
            raise ReferenceFileError(f"{path}: cannot read it ({type(err).__name__}); give a UTF-8 CSV") from None
        refs += parse_references(text, str(path))
    keys = [(r.source, *r.cell) for r in refs]
    dup = next((k for k in keys if keys.count(k) > 1), None)
    if dup:
        raise ReferenceFileError(
            f"reference cell {dup} is given by two files; give your rows another `source` name or drop one"
        )
    return refs


def sources(refs: list[Reference]) -> list[str]:
    """Source names in first-seen order (the report's column order)."""
    return list(dict.fromkeys(r.source for r in refs))
