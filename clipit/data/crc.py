"""NCT-CRC-HE-100K / CRC-VAL-HE-7K (Kather et al. 2018, Zenodo record 1214456).

Layout: unzip ``NCT-CRC-HE-100K.zip`` and ``CRC-VAL-HE-7K.zip`` side by side under ``root``::

    root/NCT-CRC-HE-100K/<class>/<class>-XXXXXXXX.tif      100,000 patches, 224 x 224, Macenko-normalised
    root/CRC-VAL-HE-7K/<class>/<class>-TCGA-XXXXXXXX.tif   7,180 patches from 50 other patients

with the 9 class folders ADI, BACK, DEB, LYM, MUC, MUS, NORM, STR, TUM (labels 0..8 in that order, as
in kaiko eva). To use the un-normalised variant, pass ``train_dir="NCT-CRC-HE-100K-NONORM"``.

Splits: kaiko eva trains on all of NCT-CRC-HE-100K and evaluates on CRC-VAL-HE-7K; CLIP-IT needs a
validation set for model selection, so NCT-CRC-HE-100K is split 80/20, stratified by class, with
seed 42 -> train 80,000 / val 20,000, and CRC-VAL-HE-7K is the test split (7,180). The split depends
only on the sorted file names, never on the file system's listing order: within each class the
sorted files are permuted by a generator seeded with (seed, label), and the per-class val counts are
allotted by largest remainder so they sum to exactly round(0.2 * N) (ties go to the lower label).
Files and keys keep that sorted order. Images are kept as stored (TIFF).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from clipit.data.base import DatasetError, FileListDataset

CRC_CLASSES = ("ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM")
CRC_SIZES = {"train": 80_000, "val": 20_000, "test": 7_180}
TIF_SUFFIXES = (".tif", ".tiff")
_FIX = "point data.root at the official files, or, for a subset or re-split, set data.expected_sizes: {train: N, val: N, test: N} (data.expected_sizes: {} skips the size check)"
_CLASS_FIX = "every split needs every class; point data.root at the official files, or, for a subset, keep images of each class in each split (data.expected_sizes only changes the size check)"


def list_class_files(folder: Path, classes: Sequence[str]) -> list[tuple[str, int]]:
    """Sorted (name relative to folder's parent, label) pairs of the TIFFs in folder/<class>/."""
    if not folder.is_dir():
        raise DatasetError(
            f"{folder}: folder not found; unzip the official archive so that data.root/{folder.name}/<class>/*.tif exists"
        )
    files = []
    for label, cls in enumerate(classes):
        cls_dir = folder / cls
        if not cls_dir.is_dir():
            raise DatasetError(
                f"{cls_dir}: class folder missing; {folder.name} must hold the folders {', '.join(classes)}"
            )
        # scandir + d_type: no stat() per file, which matters for 100k files on network storage
        with os.scandir(cls_dir) as entries:
            names = sorted(
                e.name
                for e in entries
                if e.is_file() and not e.name.startswith(".") and e.name.lower().endswith(TIF_SUFFIXES)
            )
        files += [(f"{folder.name}/{cls}/{name}", label) for name in names]
    return files


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, val) index arrays; the val share of every class is as close to val_fraction as integers allow."""
    labels = np.asarray(labels)
    n = len(labels)
    n_val = int(round(val_fraction * n))
    classes, counts = np.unique(labels, return_counts=True)
    # Largest remainder in exact integer arithmetic, so ties cannot depend on float rounding.
    share = counts.astype(np.int64) * n_val
    take = share // n
    extra = n_val - int(take.sum())
    take[np.argsort(-(share % n), kind="stable")[:extra]] += 1
    val = [
        np.random.default_rng([seed, int(c)]).permutation(np.flatnonzero(labels == c))[:k]
        for c, k in zip(classes, take)
    ]
    val_idx = np.sort(np.concatenate(val)) if val else np.zeros(0, dtype=np.int64)
    return np.setdiff1d(np.arange(n), val_idx), val_idx


def validate_split(
    where: Path,
    dataset: str,
    split: str,
    labels: np.ndarray,
    classes: Sequence[str],
    expected_sizes: Mapping[str, int] | None,
    unit: str,
) -> None:
    """Size (unless disabled) and class-set checks shared by the folder-based readers."""
    expected = None if expected_sizes is None else expected_sizes.get(split)
    if expected is not None and len(labels) != int(expected):
        raise DatasetError(
            f"{where}: {dataset} split {split!r} has {len(labels):,} {unit}, expected {int(expected):,}; {_FIX}"
        )
    missing = [classes[i] for i in sorted(set(range(len(classes))) - set(np.unique(labels).tolist()))]
    if missing:
        raise DatasetError(
            f"{where}: {dataset} split {split!r} has no images of class(es) {missing}; expected all {len(classes)} classes; {_CLASS_FIX}"
        )


class CRCDataset(FileListDataset):
    name = "crc"
    fixed_size = True  # 224 x 224
    classes = CRC_CLASSES

    def __init__(
        self,
        root: str | Path,
        expected_sizes: Mapping[str, int] | None = CRC_SIZES,
        val_fraction: float = 0.2,
        seed: int = 42,
        train_dir: str = "NCT-CRC-HE-100K",
        test_dir: str = "CRC-VAL-HE-7K",
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(
                f"{self.root}: CRC folder not found; set data.root to the folder holding {train_dir}/ and {test_dir}/"
            )
        self.file_root = self.root
        pool = list_class_files(self.root / train_dir, self.classes)
        pool_labels = np.array([label for _, label in pool], dtype=np.int64)
        train_idx, val_idx = stratified_split(pool_labels, val_fraction, seed)
        self._files = {
            "train": [pool[i] for i in train_idx],
            "val": [pool[i] for i in val_idx],
            "test": list_class_files(self.root / test_dir, self.classes),
        }
        for split in self.splits:
            where = self.root / (test_dir if split == "test" else train_dir)
            validate_split(where, "CRC", split, self.labels(split), self.classes, expected_sizes, "patches")
