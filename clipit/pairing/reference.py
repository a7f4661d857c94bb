"""The authors' pairings (github BanafshehKarimian/ModalityPairing, `Paired_indexes/`) as clipit pairs files.

`pairing.from_reference: DIR` (or `clipit pair --from-reference DIR`) maps the reference's index files
onto our samples instead of searching. Their formats, from the reference's map.py and
Data/*TDataLoaderConch.py:

  pcam_{train,val,test}_indexes.npy  1-D: per image of torchvision's PCAM split (the HDF5 order, which
                                     is ours), the line of text/text_breast.txt it was paired with
  crc_{train,val}_indexes.npy        1-D over eva's CRC "train" (all of NCT-CRC-HE-100K: class folders
                                     sorted, file names sorted within each) and "val" (CRC-VAL-HE-7K).
                                     Our train and val are both cut from eva's train; our test is its val
  bach_{train,val}_indexes.npy       2-D [N, k], of which the loader reads column 0, over eva's BACH
                                     train (268 photos) and val (132, our test); our train/val are
                                     positions p % 20 != 0 / == 0 of eva's train (clipit/data/bach.py)
  <same>_values.npy (optional)       the top-1 cosine similarities, same shape (kept as the scores;
                                     without them the scores are NaN, as for a random report)

A value j is a line index into the report file (the reference reads `[line.rstrip() for line in file]`),
which our txt corpus keeps as report id `<stem>-<j>` (clipit/corpus_formats.py). Every file is checked before
anything is written: present, an integer array (plain numpy data, never objects), one entry per image, and every
index a non-blank line of the corpus; each problem is one line naming the file and the fix.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clipit.corpus import Report
from clipit.data.base import ImageDataset
from clipit.errors import ClipitError, one_line


class ReferencePairsError(ClipitError):
    """The reference's pair indices cannot be mapped onto this dataset and corpus (one line: file and fix)."""


@dataclass(frozen=True)
class ReferenceSplit:
    """Where one of our splits sits in a reference index file: `<dataset>_<name>_indexes.npy`, whose
    entries `positions` are our samples in our order; the file has `size` entries."""

    name: str
    positions: np.ndarray
    size: int


def reference_layout(dataset: ImageDataset) -> dict[str, ReferenceSplit]:
    """Our split -> its place in the reference's index files, for pcam, crc and bach."""
    name = dataset.name
    sizes = {s: dataset.split_size(s) for s in dataset.splits}
    if name == "pcam":  # torchvision's train/val/test = the HDF5 files, in file order
        return {s: ReferenceSplit(s, np.arange(n), n) for s, n in sizes.items()}
    if name == "crc":
        # eva's train is the sorted NCT-CRC-HE-100K pool that our train and val are cut from; keys are
        # "<folder>/<class>/<file stem>" and the class folders sort like the labels, so sorting by
        # (label, key) is that order (the official file stems have one length, so no stem is another's prefix)
        pool = sorted(
            (int(label), key) for s in ("train", "val") for key, label in zip(dataset.keys(s), dataset.labels(s))
        )
        where = {key: i for i, (_, key) in enumerate(pool)}
        layout = {
            s: ReferenceSplit("train", np.array([where[k] for k in dataset.keys(s)]), len(pool))
            for s in ("train", "val")
        }
        return layout | {"test": ReferenceSplit("val", np.arange(sizes["test"]), sizes["test"])}
    if name == "bach":
        from clipit.data.bach import EVA_TRAIN_RANGES, EVA_VAL_RANGES, bach_split_indices, ranges_to_indices

        eva = {"train": ranges_to_indices(EVA_TRAIN_RANGES), "val": ranges_to_indices(EVA_VAL_RANGES)}
        ours = bach_split_indices()
        layout = {}
        for split, ref in (("train", "train"), ("val", "train"), ("test", "val")):
            where = {photo: p for p, photo in enumerate(eva[ref])}
            layout[split] = ReferenceSplit(ref, np.array([where[i] for i in ours[split]]), len(eva[ref]))
        return layout
    raise ReferencePairsError(
        f"data.name {name!r}: the reference paired pcam, crc and bach only; remove pairing.from_reference"
    )


def _load(path: Path, what: str) -> np.ndarray:
    try:
        return np.load(path)  # numpy refuses object arrays by default: no code runs from the file
    except (OSError, ValueError, EOFError) as err:
        raise ReferencePairsError(
            f"{path}: not a numpy {what} array ({one_line(err)}); copy the reference's file unchanged"
        ) from None


def _first_column(array: np.ndarray, path: Path, size: int) -> np.ndarray:
    """1-D as written, or column 0 of a 2-D [N, k] array (BACH's, read as text_ids[idx][0])."""
    if array.ndim == 2 and array.shape[1] >= 1:
        array = array[:, 0]
    if array.ndim != 1:
        raise ReferencePairsError(
            f"{path}: shape {array.shape}, expected [{size}] or [{size}, k]; is this a reference pairing file?"
        )
    if len(array) != size:
        raise ReferencePairsError(
            f"{path}: {len(array):,} entries but the split it pairs has {size:,} images; check data.root "
            "(the official, complete dataset) and that the file is this dataset's"
        )
    return array


def read_reference_split(ref_dir: Path, dataset: str, split: ReferenceSplit) -> tuple[np.ndarray, np.ndarray]:
    """(line indices, scores) of one reference file, checked; scores are NaN without a _values.npy."""
    path = ref_dir / f"{dataset}_{split.name}_indexes.npy"
    if not path.is_file():
        raise ReferencePairsError(
            f"{path}: missing; pairing.from_reference must be the folder holding the reference's "
            f"{dataset}_<split>_indexes.npy files (its Paired_indexes/)"
        )
    indices = _load(path, "index")
    if indices.dtype.kind not in "iu":
        raise ReferencePairsError(f"{path}: dtype {indices.dtype}, expected integer line indices")
    indices = _first_column(indices, path, split.size).astype(np.int64)
    values_path = path.with_name(f"{dataset}_{split.name}_values.npy")
    if not values_path.is_file():
        return indices, np.full(len(indices), np.nan, dtype=np.float32)
    values = _load(values_path, "score")
    if values.dtype.kind != "f":
        raise ReferencePairsError(f"{values_path}: dtype {values.dtype}, expected float similarities")
    values = _first_column(values, values_path, split.size).astype(np.float32)
    if not np.isfinite(values).all():
        raise ReferencePairsError(f"{values_path}: non-finite similarities; delete it (the scores become NaN)")
    return indices, values


def map_reference_pairs(
    dataset: ImageDataset, reports: list[Report], corpus_path: str | Path, ref_dir: str | Path
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """split -> (indices [N, 1] into `reports`, scores [N, 1]) from the reference's files. `reports` is
    the txt corpus read from `corpus_path` (ids `<stem>-<line>`)."""
    ref_dir, corpus_path = Path(ref_dir), Path(corpus_path)
    if not ref_dir.is_dir():
        raise ReferencePairsError(
            f"{ref_dir}: folder not found; set pairing.from_reference to the reference's Paired_indexes/"
        )
    position = {r.id: i for i, r in enumerate(reports)}
    lines = {f"{corpus_path.stem}-{j}": j for j in range(_line_count(corpus_path))}
    if not set(position) <= set(lines):
        raise ReferencePairsError(
            f"{corpus_path}: report ids are not <file stem>-<line>; pairing.from_reference needs the "
            "reference's report file read as reports.format: txt"
        )
    line_to_text = np.full(len(lines), -1, dtype=np.int64)  # -1: a blank line, skipped by the corpus
    for rid, j in lines.items():
        line_to_text[j] = position.get(rid, -1)
    read: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
    pairs = {}
    for split, ref in reference_layout(dataset).items():
        if (dataset.name, ref.name) not in read:
            read[(dataset.name, ref.name)] = read_reference_split(ref_dir, dataset.name, ref)
        indices, values = read[(dataset.name, ref.name)]
        file = ref_dir / f"{dataset.name}_{ref.name}_indexes.npy"
        lo, hi = int(indices.min(initial=0)), int(indices.max(initial=0))
        if lo < 0 or hi >= len(line_to_text):
            raise ReferencePairsError(
                f"{file}: line index {lo if lo < 0 else hi} is outside {corpus_path} ({len(line_to_text)} lines); "
                "reports.path must be the report file these indices were made with"
            )
        mapped = line_to_text[indices[ref.positions]]
        if (mapped < 0).any():
            j = int(indices[ref.positions][mapped < 0][0])
            raise ReferencePairsError(
                f"{file}: pairs images with line {j + 1} of {corpus_path}, which is blank; "
                "reports.path must be the report file these indices were made with"
            )
        pairs[split] = (mapped[:, None], values[ref.positions][:, None])
    return pairs


def _line_count(corpus_path: Path) -> int:
    """Lines of the txt corpus as Python's text mode splits them (the reference's and the corpus reader's
    way), blank ones included; latin-1 decodes any byte and splits lines like UTF-8 does."""
    try:
        with open(corpus_path, encoding="latin-1") as f:
            return sum(1 for _ in f)
    except OSError as err:
        raise ReferencePairsError(f"{corpus_path}: cannot read ({err.strerror}); check reports.path") from None


def reference_digest(ref_dir: str | Path) -> str | None:
    """sha256 over the reference files in `ref_dir` (names and bytes): pairs imported from other files are
    not current (pairing_spec records it). None for a folder that does not exist (the import says so)."""
    ref_dir = Path(ref_dir)
    if not ref_dir.is_dir():
        return None
    digest = hashlib.sha256()
    for path in sorted(ref_dir.glob("*_indexes.npy")) + sorted(ref_dir.glob("*_values.npy")):
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
