"""External report corpora (CLIP-IT Stage 1): what a report is (Report), the error of an unusable corpus
or text-embedding cache (CorpusError), the fingerprint that ties caches and shards to a corpus's texts,
and writing a corpus as JSONL.

Reading a corpus: clipit/corpus_reader.py (load_reports: fields, project map, filters) on
clipit/corpus_formats.py (one record reader per file format, the declared text encoding). Passages that
fit a text encoder: clipit/corpus_passages.py.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

from clipit.errors import ClipitError
from clipit.io import atomic_write_text

_RESERVED = ("id", "text", "organ", "project", "parent_id")


class CorpusError(ClipitError):
    """A report corpus or embedding cache is unusable (one line: the file and the fix)."""


@dataclass(frozen=True)
class Report:
    id: str
    text: str
    organ: str | None = None
    project: str | None = None  # TCGA project without the "TCGA-" prefix: BRCA, COAD, READ, ...
    meta: dict = field(default_factory=dict, hash=False)  # e.g. {"patient": barcode} or a demo's "demo_class"
    parent_id: str | None = None  # set on passages made by corpus_passages.chunk_reports


def corpus_fingerprint(reports: Iterable[Report]) -> str:
    """sha256 over (id, text) in order; length-prefixed so that no two corpora hash alike by concatenation."""
    h = hashlib.sha256()
    for r in reports:
        for s in (r.id, r.text):
            b = s.encode("utf-8")
            h.update(len(b).to_bytes(8, "little") + b)
    return h.hexdigest()


def save_reports_jsonl(reports: Iterable[Report], path: str | os.PathLike) -> None:
    """One flat JSON object per report (meta fields at top level), readable again by load_reports."""
    lines = []
    for r in reports:
        clash = set(r.meta) & set(_RESERVED)
        if clash:
            raise CorpusError(
                f"{path}: report {r.id!r} has meta keys {sorted(clash)} shadowing Report fields; rename them"
            )
        rec = {"id": r.id, "text": r.text, "organ": r.organ, "project": r.project, "parent_id": r.parent_id}
        rec = {k: v for k, v in rec.items() if v is not None} | r.meta
        lines.append(json.dumps(rec, ensure_ascii=False, default=str) + "\n")
    atomic_write_text(path, "".join(lines))
