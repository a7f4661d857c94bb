"""PatchCamelyon (PCam) read from the official HDF5 files.

Layout (the Zenodo record 2546921 downloads, gunzipped), all directly under ``root``::

    camelyonpatch_level_2_split_{train,valid,test}_x.h5   dataset "x": N x 96 x 96 x 3 uint8
    camelyonpatch_level_2_split_{train,valid,test}_y.h5   dataset "y": N x 1 x 1 x 1 uint8

Splits train / val / test map to the files' train / valid / test and hold 262,144 / 32,768 / 32,768
patches of 2 classes (0 normal, 1 tumor), checked as kaiko eva does. Patches are raw arrays, so they
are encoded losslessly to PNG. h5py handles are opened lazily and per process: a handle inherited
through fork() is not safe to read from, so a process that finds handles opened by another pid
drops them and reopens its own.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import h5py
import numpy as np

from clipit.data.base import DatasetError, ImageDataset, ImageSample, encode_png
from clipit.errors import one_line

PCAM_SIZES = {"train": 262_144, "val": 32_768, "test": 32_768}
FILE_SPLITS = {"train": "train", "val": "valid", "test": "test"}
FILE_PATTERN = "camelyonpatch_level_2_split_{split}_{xy}.h5"
_FIX = "point data.root at the official files, or, for a subset or re-split, set data.expected_sizes: {train: N, val: N, test: N} (data.expected_sizes: {} skips the size check)"
_CLASS_FIX = "every split needs every class; point data.root at the official files, or, for a subset, keep images of each class in each split (data.expected_sizes only changes the size check)"


def _key(split: str, index: int) -> str:
    return f"{split}/{index:06d}"


def pcam_file(root: str | Path, split: str, xy: str) -> Path:
    return Path(root) / FILE_PATTERN.format(split=FILE_SPLITS[split], xy=xy)


def _open_h5(path: Path) -> h5py.File:
    if not path.is_file():
        hint = (
            f"gunzip {path.name}.gz first"
            if Path(f"{path}.gz").is_file()
            else (
                "PCAM needs the six official camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5 files under data.root"
            )
        )
        raise DatasetError(f"{path}: file not found; {hint}")
    try:
        try:  # no flock: read-only, and flock fails on some cluster file systems (Lustre, NFS)
            return h5py.File(path, "r", locking=False)
        except ValueError as err:  # HDF5 older than 1.10.7 has no locking option
            if "locking" not in str(err):
                raise
            return h5py.File(path, "r")
    except (OSError, ValueError) as err:
        raise DatasetError(f"{path}: not a readable HDF5 file ({one_line(err)}); re-download and gunzip it") from None


def _dataset(file: h5py.File, path: Path, name: str) -> h5py.Dataset:
    obj = file.get(name)
    if not isinstance(obj, h5py.Dataset):
        raise DatasetError(
            f"{path}: no HDF5 dataset {name!r} (found {sorted(file.keys())}); is this an official PCAM file?"
        )
    return obj


class PCamDataset(ImageDataset):
    name = "pcam"
    fixed_size = True  # 96 x 96
    classes = ("normal", "tumor")

    def __init__(self, root: str | Path, expected_sizes: Mapping[str, int] | None = PCAM_SIZES, block: int = 256):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(
                f"{self.root}: PCAM folder not found; set data.root to the folder holding the official camelyonpatch_level_2_split_*.h5 files"
            )
        self.block = block  # rows read per h5 call when iterating: one read per patch is slow on chunked files
        self._labels = {split: self._validate(split, expected_sizes) for split in self.splits}
        self._pid: int | None = None
        self._handles: dict[str, tuple[h5py.File, h5py.Dataset]] = {}

    def _validate(self, split: str, expected_sizes: Mapping[str, int] | None) -> np.ndarray:
        """Read the (small) labels, check them against x's shape; the handles are closed again."""
        xp, yp = pcam_file(self.root, split, "x"), pcam_file(self.root, split, "y")
        with _open_h5(yp) as f:
            y = _dataset(f, yp, "y")
            if y.ndim < 1 or y.size != y.shape[0]:
                raise DatasetError(f"{yp}: 'y' has shape {y.shape}, expected N x 1 x 1 x 1 labels")
            try:
                labels = np.asarray(y[()]).reshape(-1).astype(np.int64)
            except (OSError, RuntimeError) as err:
                raise DatasetError(f"{yp}: labels unreadable ({one_line(err)}); re-download and gunzip it") from None
        with _open_h5(xp) as f:
            x = _dataset(f, xp, "x")
            if x.ndim != 4 or x.shape[3] != 3 or x.dtype != np.uint8:
                raise DatasetError(f"{xp}: 'x' is {x.dtype} {x.shape}, expected uint8 N x 96 x 96 x 3 patches")
            n = x.shape[0]
        if n != len(labels):
            raise DatasetError(
                f"{xp}: {n:,} patches but {yp.name} has {len(labels):,} labels; x and y must come from the same split"
            )
        expected = None if expected_sizes is None else expected_sizes.get(split)
        if expected is not None and n != int(expected):
            raise DatasetError(f"{xp}: PCAM split {split!r} has {n:,} patches, expected {int(expected):,}; {_FIX}")
        found = sorted(int(v) for v in np.unique(labels))
        if found != list(range(len(self.classes))):
            raise DatasetError(
                f"{yp}: PCAM split {split!r} has label values {found}, expected [0, 1] ({'/'.join(self.classes)}); {_CLASS_FIX}"
            )
        return labels

    def _x(self, split: str) -> tuple[Path, h5py.Dataset]:
        if self._pid != os.getpid():  # fresh process (fork/spawn): never touch the parent's handles
            self._handles, self._pid = {}, os.getpid()
        path = pcam_file(self.root, split, "x")
        if split not in self._handles:
            f = _open_h5(path)
            self._handles[split] = (f, _dataset(f, path, "x"))
        return path, self._handles[split][1]

    def _read(self, split: str, start: int, stop: int) -> np.ndarray:
        path, x = self._x(split)
        try:
            return x[start:stop]
        except (OSError, RuntimeError, ValueError) as err:
            raise DatasetError(
                f"{path}: cannot read patches {start}..{stop - 1} ({one_line(err)}); the file is truncated or corrupt, re-download it"
            ) from None

    def split_size(self, split: str) -> int:
        self.check_split(split)
        return len(self._labels[split])

    def _sample(self, split: str, index: int, array: np.ndarray) -> ImageSample:
        return ImageSample(
            key=_key(split, index), data=encode_png(array), ext="png", label=int(self._labels[split][index])
        )

    def sample(self, split: str, index: int) -> ImageSample:
        n = self.split_size(split)
        if not -n <= index < n:
            raise IndexError(f"PCAM split {split!r} has {n} patches; index {index} is out of range")
        index %= n
        return self._sample(split, index, self._read(split, index, index + 1)[0])

    def iter_split(self, split: str, start: int = 0, stop: int | None = None) -> Iterator[ImageSample]:
        stop = self.split_size(split) if stop is None else min(stop, self.split_size(split))
        for lo in range(start, stop, self.block):
            hi = min(lo + self.block, stop)
            for offset, array in enumerate(self._read(split, lo, hi)):
                yield self._sample(split, lo + offset, array)

    def keys(self, split: str) -> list[str]:
        return [_key(split, index) for index in range(self.split_size(split))]  # without reading a patch

    def labels(self, split: str) -> np.ndarray:
        self.check_split(split)
        return self._labels[split].copy()

    def close(self) -> None:
        if self._pid == os.getpid():
            for f, _ in self._handles.values():
                f.close()
        self._handles = {}

    def __getstate__(self) -> dict:
        # Pickled copies (spawned workers) open their own handles.
        return {**self.__dict__, "_handles": {}, "_pid": None}
