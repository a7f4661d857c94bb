"""A report file's raw records, one reader per format (csv or a zip holding one csv, jsonl, parquet,
txt), each yielding (where, record) so that errors name the row; clipit/corpus_reader.py makes Reports of
them.

Text files are read in one declared encoding (``reports.encoding``, default UTF-8), never guessed: a
wrong guess (latin-1 vs cp1252, say) would silently change texts and with them the corpus
fingerprint and the pairing. A byte that does not decode is one error naming the file, the line and
the byte, and the fix (set ``reports.encoding`` or convert the file with iconv).
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import io
import json
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

from clipit.corpus import CorpusError
from clipit.errors import one_line

FORMATS = ("csv", "jsonl", "parquet", "txt")
SUFFIX_FORMATS = {
    ".csv": "csv",
    ".zip": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".txt": "txt",
}
ENCODING_FIX = (
    "set reports.encoding to the file's encoding (e.g. latin-1, cp1252) or convert it to UTF-8 "
    "(iconv -f latin1 -t utf-8)"
)


def _text_encoding(encoding: str) -> str:
    """UTF-8 also reads a byte-order mark (Excel writes one)."""
    return "utf-8-sig" if codecs.lookup(encoding).name == "utf-8" else encoding


def decode_error(path: Path, encoding: str, fix: str, member: str | None = None) -> CorpusError:
    """One line naming the first line of `path` (or of zip `member`) that does not decode, and the byte."""
    line_no, detail = None, ""
    try:
        with contextlib.ExitStack() as stack:
            raw = (
                stack.enter_context(stack.enter_context(zipfile.ZipFile(path)).open(member))
                if member
                else stack.enter_context(open(path, "rb"))
            )
            decoder = codecs.getincrementaldecoder(_text_encoding(encoding))()
            for number, line in enumerate(raw, 1):
                try:
                    decoder.decode(line)
                except UnicodeDecodeError as e:
                    line_no, detail = number, f"byte 0x{line[e.start]:02x} at column {e.start + 1}"
                    break
    except (OSError, zipfile.BadZipFile, LookupError, IndexError):
        pass
    where = f"{path}" + (f" ({member})" if member else "")
    at = f"line {line_no} ({detail})" if line_no else "it"
    return CorpusError(f"{where}: {at} is not {encoding} text; {fix}")


def read_records(path: Path, fmt: str, encoding: str = "utf-8") -> Iterator[tuple[str, dict]]:
    """Yield (where, record) pairs; `where` names the row in error messages."""
    text_encoding = _text_encoding(encoding)
    if fmt == "csv":
        csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # whole reports (up to ~25k chars) sit in one field
        with contextlib.ExitStack() as stack:
            member = None
            if path.suffix == ".zip":
                try:
                    zf = stack.enter_context(zipfile.ZipFile(path))
                except zipfile.BadZipFile:
                    raise CorpusError(
                        f"{path}: not a readable zip file; re-download it, or unzip it and point "
                        "reports.path at the csv"
                    ) from None
                names = [n for n in zf.namelist() if n.endswith(".csv") and not n.startswith("__MACOSX")]
                if len(names) != 1:
                    raise CorpusError(
                        f"{path}: expected exactly one .csv inside the zip, found {names}; unzip it "
                        "and point reports.path at the csv"
                    )
                member = names[0]
                f = io.TextIOWrapper(stack.enter_context(zf.open(member)), encoding=text_encoding, newline="")
            else:
                f = stack.enter_context(open(path, encoding=text_encoding, newline=""))
            reader = csv.DictReader(f)
            try:
                for i, row in enumerate(reader):
                    yield f"row {i + 2}", row  # +2: 1-based and the header line
            except UnicodeDecodeError:
                raise decode_error(path, encoding, ENCODING_FIX, member) from None
            except csv.Error as e:
                raise CorpusError(
                    f"{path}: line {reader.line_num} is not readable csv ({e}); fix the file or set reports.format"
                ) from None
    elif fmt == "jsonl":
        with open(path, encoding=text_encoding) as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CorpusError(f"{path}: line {i} is not valid JSON ({e.msg}); fix or drop it") from None
                if not isinstance(rec, dict):
                    raise CorpusError(f"{path}: line {i} is not a JSON object; write one {{id, text}} per line")
                yield f"line {i}", rec
    elif fmt == "parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise CorpusError(f"{path}: reading parquet needs pyarrow; pip install pyarrow (or use jsonl)") from None
        try:
            records = pq.read_table(path).to_pylist()
        except Exception as e:
            raise CorpusError(
                f"{path}: not a readable parquet file ({one_line(e)}); re-export it or use jsonl"
            ) from None
        for i, rec in enumerate(records):
            if not isinstance(rec, dict):
                raise CorpusError(f"{path}: row {i} is not a record; write one {{id, text}} per row")
            yield f"row {i}", rec
    else:  # txt
        with open(path, encoding=text_encoding) as f:
            for i, line in enumerate(f):
                yield f"line {i + 1}", {"id": f"{path.stem}-{i}", "text": line.rstrip()}
