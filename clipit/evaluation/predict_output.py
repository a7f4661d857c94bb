"""What `clipit predict` writes, row by row as batches finish (nothing is collected in memory):

  --out FILE.csv    image,x,y,width,height,prediction,<one probability column per class>
  --out FILE.json   a list of {"image", "x", "y", "width", "height", "prediction", "probabilities": {class: p}}
  (no --out)        stdout: a tab-separated table image,prediction,<classes>, or with --json a JSON list
  --features F.safetensors   tensor "features" float32 [rows, D]: row i is the backbone embedding of row i

Files appear only complete (clipit.io.atomic_path): a run that stops leaves none of them.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import numpy as np

from clipit.evaluation.predict_inputs import Row
from clipit.evaluation.slide import PredictError
from clipit.io import atomic_path, make_dirs, temp_prefix

FIXED = ("image", "x", "y", "width", "height", "prediction")


@contextlib.contextmanager
def reader_may_leave():
    """`clipit predict ... | head`: when the reader of stdout leaves, end quietly as `cat` does (exit 128 +
    SIGPIPE), not with a BrokenPipeError traceback; stdout then points at /dev/null, so the interpreter's
    last flush does not raise again. Outputs being written are removed by their writers' cleanup."""
    try:
        yield
    except BrokenPipeError:
        with contextlib.suppress(AttributeError, OSError, ValueError):  # stdout without a descriptor: nothing to do
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(128 + signal.SIGPIPE) from None


FEATURES = "features"


class RowWriter:
    def __init__(self, out: Path | None, classes: list[str], stack: contextlib.ExitStack, stdout_json: bool = False):
        self.classes, self.first = classes, True
        if out is None:
            self.mode, self.file = ("stdout-json" if stdout_json else "table"), None
            if self.mode == "table":
                print("\t".join(["image", "prediction", *classes]))
            return
        self.mode = out.suffix.lower().lstrip(".")
        if self.mode not in ("csv", "json"):
            raise PredictError(f"--out {out}: write .csv or .json (a {out.suffix or 'suffix-less'} file is neither)")
        tmp = stack.enter_context(atomic_path(out))
        self.file = stack.enter_context(open(tmp, "w", newline="", encoding="utf-8"))
        if self.mode == "csv":
            self.csv = csv.writer(self.file)
            self.csv.writerow([*FIXED, *(f"p_{c}" if c in FIXED else c for c in classes)])

    def write(self, rows: list[Row], probs: np.ndarray) -> None:
        for row, p in zip(rows, probs):
            prediction = self.classes[int(p.argmax())]
            if self.mode == "csv":
                self.csv.writerow(
                    [row.image, row.x, row.y, row.width, row.height, prediction, *(f"{v:.6f}" for v in p)]
                )
            elif self.mode == "table":
                print("\t".join([row.image, prediction, *(f"{v:.6f}" for v in p)]))
            else:
                record = {
                    "image": row.image,
                    "x": row.x,
                    "y": row.y,
                    "width": row.width,
                    "height": row.height,
                    "prediction": prediction,
                    "probabilities": dict(zip(self.classes, map(float, p))),
                }
                if self.mode == "stdout-json":
                    record = {k: record[k] for k in ("image", "prediction", "probabilities")}
                text = ("[" if self.first else ",\n") + json.dumps(record)
                print(text, end="") if self.file is None else self.file.write(text)
            self.first = False

    def close(self) -> None:
        if self.mode in ("json", "stdout-json"):
            end = ("[" if self.first else "") + "]\n"
            print(end, end="") if self.file is None else self.file.write(end)


class FeatureWriter:
    """Streams rows to a scratch file next to `path`, then writes the safetensors file (8-byte header length,
    JSON header, raw little-endian data) in one pass, so no [rows, D] array is ever held."""

    def __init__(self, path: Path, dim: int, metadata: dict[str, str], stack: contextlib.ExitStack):
        if path.suffix != ".safetensors":
            raise PredictError(f"--features {path}: name it *.safetensors")
        self.path, self.dim, self.metadata, self.rows = path, int(dim), metadata, 0
        make_dirs(path.parent)
        fd, scratch = tempfile.mkstemp(prefix=temp_prefix(path.name), suffix=".rows", dir=path.parent)
        stack.callback(lambda: os.path.exists(scratch) and os.unlink(scratch))
        self.scratch = stack.enter_context(os.fdopen(fd, "w+b"))
        self.stack = stack

    def write(self, features: np.ndarray) -> None:
        features = np.ascontiguousarray(features, dtype="<f4")
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise PredictError(
                f"--features: the backbone gave features of shape {features.shape[1:]}, the export's "
                f"config.json says {self.dim}; re-export the model"
            )
        self.scratch.write(features.tobytes())
        self.rows += len(features)

    def close(self) -> None:
        nbytes = self.rows * self.dim * 4
        header = {
            FEATURES: {"dtype": "F32", "shape": [self.rows, self.dim], "data_offsets": [0, nbytes]},
            "__metadata__": self.metadata,
        }
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self.scratch.flush()
        self.scratch.seek(0)
        with atomic_path(self.path) as tmp, open(tmp, "wb") as out:
            out.write(len(blob).to_bytes(8, "little") + blob)
            shutil.copyfileobj(self.scratch, out, 16 << 20)
