"""Reading a report corpus into Reports (clipit/corpus.py): load_reports, its fields, project map and
filters.

Formats (``fmt="auto"`` picks by suffix; the reader of each: clipit/corpus_formats.py):
* ``csv`` (or a ``.zip`` holding one csv): TCGA-Reports (Kefeli & Tatonetti 2024, ``TCGA_Reports.csv``,
  columns ``patient_filename,text``) or any csv with ``id,text[,organ][,project]`` columns.
  TCGA-Reports carries no cancer type: pass ``project_map`` (a dict patient barcode -> project, or a
  csv such as the same repository's ``data/tcga_metadata/tcga_patient_to_cancer_type.csv`` with
  ``patient_id,cancer_type``) to filter by project or organ.
* ``jsonl``/``parquet``: one record ``{id, text, organ | project, ...}`` per row; other fields go to ``meta``.
* ``txt``: one report per line, as the reference's ``text_colo.txt``; ids are ``<stem>-<i>`` with ``i`` the
  0-based line index, i.e. the number the reference's ``*_indexes.npy`` pairing arrays hold.

Whitespace (``reports.whitespace``): ``keep`` (the default) leaves each text as written, except that a txt
line loses its trailing whitespace and line break (the reference reads ``line.rstrip()``). CONCH's
tokenizer does *not* normalise whitespace: a line break or a double space changes its tokens (123 of
the 376 reports of the reference's colon file tokenize differently once collapsed), so keeping the text
is what the reference encodes. ``collapse`` turns runs of spaces/newlines into one space. Texts that are
empty or blank are skipped with a warning (OCR'd corpora have blank rows; one blank report should not stop a
run); a txt report keeps its line index as its id either way. A corpus left empty is an error.

Errors name the config keys (``reports.*``) that fix them; the library arguments have the same names.
"""

from __future__ import annotations

import codecs
import csv
import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from clipit.corpus import CorpusError, Report
from clipit.corpus_formats import ENCODING_FIX, FORMATS, SUFFIX_FORMATS, decode_error, read_records
from clipit.errors import one_line
from clipit.io import read_json_object

log = logging.getLogger(__name__)

ORGAN_PROJECTS: dict[str, tuple[str, ...]] = {"breast": ("BRCA",), "colon": ("COAD", "READ")}
# Field names tried in order; the second ones are TCGA-Reports / HF Lab-Rasool/TCGA / GDC names.
_ID_FIELDS = ("id", "patient_filename")
_TEXT_FIELDS = ("text", "report_text")
_ORGAN_FIELDS = ("organ", "tissue_or_organ_of_origin")
_PROJECT_FIELDS = ("project", "project_id", "cancer_type")
_MAP_PATIENT = ("patient_id", "case_submitter_id", "bcr_patient_barcode", "submitter_id", "patient")
_MAP_PROJECT = ("cancer_type", "project_id", "project")
_BARCODE = re.compile(r"^(TCGA-[A-Z0-9]{2}-[A-Z0-9]{4})", re.IGNORECASE)


def _norm_project(value: Any) -> str | None:  # "TCGA-BRCA", " brca" -> "BRCA"
    s = str(value).strip().upper() if value is not None else ""
    return s.removeprefix("TCGA-") or None


def _barcode(s: str) -> str | None:  # "TCGA-BP-5195.25c0..." or a sample barcode -> "TCGA-BP-5195"
    m = _BARCODE.match(s.strip())
    return m.group(1).upper() if m else None


def _pick(rec: Mapping, names: Iterable[str]) -> tuple[str | None, Any]:
    """First of `names` with a non-empty value, else the first one present (so "empty" != "missing")."""
    present = [n for n in names if n in rec]
    for n in present:
        if rec[n] not in (None, "", [], ()):
            return n, rec[n]
    return (present[0], rec[present[0]]) if present else (None, None)


def load_project_map(src: str | os.PathLike | Mapping[str, str] | None) -> dict[str, str]:
    """patient barcode (TCGA-XX-XXXX) -> project, from a dict, a .json dict, or a csv/tsv with a header."""
    if src is None:
        return {}
    if isinstance(src, Mapping):
        items = list(src.items())
    else:
        p = Path(src)
        if not p.is_file():
            raise CorpusError(
                f"{p}: project map not found; fix reports.project_map (a csv with "
                "patient_id,cancer_type columns, or a json mapping)"
            )
        try:
            if p.suffix == ".json":
                data = read_json_object(
                    p,
                    "a json project map is an object of barcode -> project; fix reports.project_map",
                    error=lambda path, why: CorpusError(f"{path}: project map: {why}"),
                )
                return load_project_map(data)
            with open(p, encoding="utf-8-sig", newline="") as f:
                reader = csv.DictReader(f, delimiter="\t" if p.suffix == ".tsv" else ",")
                cols = reader.fieldnames or []
                pc, jc = (next((c for c in names if c in cols), None) for names in (_MAP_PATIENT, _MAP_PROJECT))
                if pc is None or jc is None:
                    raise CorpusError(
                        f"{p}: project map needs a patient column {_MAP_PATIENT} and a project "
                        f"column {_MAP_PROJECT}; found {cols}"
                    )
                items = [(row[pc], row[jc]) for row in reader]
        except UnicodeDecodeError:
            raise decode_error(p, "utf-8", "project map; save it as UTF-8") from None
        except csv.Error as e:
            raise CorpusError(f"{p}: project map is not a readable csv ({e})") from None
    return {(_barcode(str(k)) or str(k).strip().upper()): _norm_project(v) for k, v in items if v}


def _fields(rec: dict) -> str:
    names = [str(k) for k in rec if k is not None]
    return str(names[:12]) + (" ..." if len(names) > 12 else "")


def _to_report(
    rec: dict,
    where: str,
    path: Path,
    text_field: str | None,
    id_field: str | None,
    pmap: Mapping[str, str],
    whitespace: str = "keep",
) -> Report | None:
    tk, text = (text_field, rec.get(text_field)) if text_field else _pick(rec, _TEXT_FIELDS)
    if tk is None or tk not in rec:
        which = f"field {text_field!r} (reports.text_field)" if text_field else f"text field {_TEXT_FIELDS}"
        raise CorpusError(
            f"{path}: {where} has no {which}; it has {_fields(rec)}; set reports.text_field to "
            "the one that holds the report"
        )
    if isinstance(text, (list, tuple)):  # HF Lab-Rasool/TCGA: report_text is a list; the reference takes [0]
        text = text[0] if text else None
    text = str(text) if text is not None else ""
    if whitespace == "collapse":
        text = " ".join(text.split())
    if not text.strip():
        return None
    ik, rid = (id_field, rec.get(id_field)) if id_field else _pick(rec, _ID_FIELDS)
    if ik is None or rid is None or not str(rid).strip():
        which = f"field {id_field!r} (reports.id_field)" if id_field else f"id field {_ID_FIELDS}"
        raise CorpusError(
            f"{path}: {where} has no {which}; it has {_fields(rec)}; add ids or set "
            "reports.id_field to the one that holds them"
        )
    rid = str(rid).strip()
    ok, organ = _pick(rec, _ORGAN_FIELDS)
    jk, project = _pick(rec, _PROJECT_FIELDS)
    meta = {k: v for k, v in rec.items() if k not in {tk, ik, ok, jk, "parent_id"}}
    patient = _barcode(rid)
    if patient:
        meta.setdefault("patient", patient)
    project = _norm_project(project) or (pmap.get(patient) if patient else None)
    organ = str(organ).strip() if organ not in (None, "") else None
    return Report(rid, text, organ, project, meta, rec.get("parent_id") or None)


def _organ_ok(r: Report, kw: str) -> bool:
    """Reference semantics: case-insensitive substring of the organ; reports with only a TCGA project
    match through ORGAN_PROJECTS ("colo" -> colon -> COAD/READ)."""
    if r.organ is not None:
        return kw in r.organ.lower()
    return r.project in {p for name, ps in ORGAN_PROJECTS.items() if kw in name for p in ps}


def load_reports(
    path: str | os.PathLike,
    fmt: str = "auto",
    organ: str | None = None,
    projects: Iterable[str] | str | None = None,
    text_field: str | None = None,
    id_field: str | None = None,
    project_map: str | os.PathLike | Mapping[str, str] | None = None,
    encoding: str = "utf-8",
    whitespace: str = "keep",
) -> list[Report]:
    """Read a report corpus in file order, optionally keeping only one organ and/or TCGA projects
    (both filters must match). ``project_map`` fills ``project`` for records with a TCGA barcode id.
    The arguments are the config's ``reports.*`` keys of the same names (``fmt``: ``reports.format``)."""
    if whitespace not in ("keep", "collapse"):
        raise CorpusError(f"{path}: unknown whitespace mode {whitespace!r}; set reports.whitespace to keep or collapse")
    path = Path(path)
    if not path.is_file():
        raise CorpusError(
            f"{path}: report corpus not found; check reports.path (TCGA_Reports.csv.zip is in "
            "github.com/tatonetti-lab/tcga-path-reports)"
        )
    if fmt == "auto":
        fmt = SUFFIX_FORMATS.get(path.suffix.lower(), "")
        if not fmt:
            raise CorpusError(f"{path}: unknown report format {path.suffix!r}; set reports.format to one of {FORMATS}")
    elif fmt not in FORMATS:
        raise CorpusError(f"{path}: unknown report format {fmt!r}; set reports.format to one of {FORMATS}")
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise CorpusError(
            f"{path}: unknown text encoding {encoding!r}; set reports.encoding to e.g. utf-8, latin-1 or cp1252"
        ) from None
    pmap = load_project_map(project_map)
    reports, seen, skipped = [], {}, 0
    records = read_records(path, fmt, encoding)
    try:
        for where, rec in records:
            r = _to_report(rec, where, path, text_field, id_field, pmap, whitespace)
            if r is None:
                skipped += 1
                continue
            if r.id in seen:
                raise CorpusError(
                    f"{path}: duplicate report id {r.id!r} ({seen[r.id]} and {where}); "
                    "make ids unique or set reports.id_field to a column of unique ids"
                )
            seen[r.id] = where
            reports.append(r)
    except UnicodeDecodeError:  # jsonl and txt (csv names its zip member itself)
        raise decode_error(path, encoding, ENCODING_FIX) from None
    except OSError as e:
        raise CorpusError(
            f"{path}: cannot read the report corpus ({e.strerror or one_line(e)}); check "
            "reports.path and its permissions"
        ) from None
    finally:
        records.close()
    if skipped:
        log.warning("%s: skipped %d report(s) with empty text", path, skipped)
    if pmap and (unmapped := sum(r.project is None for r in reports)):
        log.warning("%s: %d of %d reports have no project in project_map", path, unmapped, len(reports))
    if not reports:
        raise CorpusError(f"{path}: no reports ({skipped} empty texts skipped); check the file and reports.text_field")
    if organ is None and projects is None:
        return reports
    want = None
    if projects is not None:
        want = {_norm_project(p) for p in ([projects] if isinstance(projects, str) else projects)}
    if not any(r.organ or r.project for r in reports):
        raise CorpusError(
            f"{path}: no report has an organ or project to filter on; set reports.project_map "
            "(e.g. tcga_patient_to_cancer_type.csv) or drop reports.organ / reports.projects"
        )
    kw = organ.lower() if organ is not None else None
    kept = [r for r in reports if (kw is None or _organ_ok(r, kw)) and (want is None or r.project in want)]
    if not kept:
        organs = sorted({r.organ for r in reports if r.organ})[:10]
        projs = sorted({r.project for r in reports if r.project})[:10]
        raise CorpusError(
            f"{path}: filter organ={organ!r} projects={sorted(want) if want else None} kept 0 of "
            f"{len(reports)} reports (organs: {organs}, projects: {projs}); loosen reports.organ / "
            "reports.projects"
        )
    log.info("%s: kept %d of %d reports (organ=%r, projects=%s)", path, len(kept), len(reports), organ, want)
    return kept
