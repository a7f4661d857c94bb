"""BACH (ICIAR 2018 Grand Challenge on BreAst Cancer Histology), microscopy photos only.

Layout (``ICIAR2018_BACH_Challenge.zip`` from Zenodo record 3632035, unzipped under ``root``)::

    root/ICIAR2018_BACH_Challenge/Photos/{Benign,InSitu,Invasive,Normal}/{b,is,iv,n}001..100.tif

400 RGB TIFFs of 2048 x 1536, 100 per class; labels follow kaiko eva: Benign 0, InSitu 1,
Invasive 2, Normal 3. ``root`` may also be the ``ICIAR2018_BACH_Challenge`` or ``Photos`` folder.
Bytes are kept as stored (no resizing here).

Splits. kaiko eva (src/eva/vision/data/datasets/classification/bach.py) lists the photos like
torchvision's ``make_dataset`` (classes in sorted order, sorted file names: index 0..399) and splits
them patient-aware by fixed index ranges (EVA_TRAIN_RANGES / EVA_VAL_RANGES below, half-open,
copied from eva) into 268 train / 132 val. CLIP-IT evaluates on eva's val, so it is our TEST split,
and the reference code (BanafshehKarimian/ModalityPairing, Data/BACHDataLoader.py) draws validation
from eva's train: positions p with p % 20 == 0 of eva's train list go to val, the rest stay in
train -> 254 train / 14 val / 132 test. (The reference code then indexed val into the already
subset train list, which overlaps train and runs past its end; we keep the evident intent: disjoint.)
Note that val is therefore not patient-disjoint from train; test is.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from clipit.data.base import DatasetError, FileListDataset
from clipit.data.crc import list_class_files, validate_split

BACH_CLASSES = ("Benign", "InSitu", "Invasive", "Normal")
BACH_PER_CLASS = 100
BACH_SIZES = {"train": 254, "val": 14, "test": 132}
# kaiko eva's patient-aware ranges over the 400 sorted photos (train 268, val 132).
EVA_TRAIN_RANGES = ((0, 41), (59, 60), (90, 139), (169, 240), (258, 260), (273, 345), (368, 400))
EVA_VAL_RANGES = ((41, 59), (60, 90), (139, 169), (240, 258), (260, 273), (345, 368))
VAL_EVERY = 20  # CLIP-IT reference code: every 20th of eva's train images -> val


def ranges_to_indices(ranges) -> list[int]:
    return [i for start, stop in ranges for i in range(start, stop)]


def bach_split_indices() -> dict[str, list[int]]:
    """Indices into the 400 sorted photos for our train / val / test."""
    eva_train = ranges_to_indices(EVA_TRAIN_RANGES)
    return {
        "train": [i for p, i in enumerate(eva_train) if p % VAL_EVERY != 0],
        "val": [i for p, i in enumerate(eva_train) if p % VAL_EVERY == 0],
        "test": ranges_to_indices(EVA_VAL_RANGES),
    }


def find_photos(root: Path) -> Path:
    for candidate in (root / "ICIAR2018_BACH_Challenge" / "Photos", root / "Photos", root):
        if all((candidate / cls).is_dir() for cls in BACH_CLASSES):
            return candidate
    raise DatasetError(
        f"{root}: BACH photos not found; set data.root to the folder holding "
        f"ICIAR2018_BACH_Challenge/Photos/{{{','.join(BACH_CLASSES)}}}/*.tif (unzip ICIAR2018_BACH_Challenge.zip)"
    )


class BACHDataset(FileListDataset):
    """The 400-photo structure is always checked (eva's index ranges only mean something on it);
    ``expected_sizes=None`` disables only the per-split size check."""

    name = "bach"
    fixed_size = True  # 2048 x 1536
    classes = BACH_CLASSES

    def __init__(self, root: str | Path, expected_sizes: Mapping[str, int] | None = BACH_SIZES):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(
                f"{self.root}: BACH folder not found; set data.root to the folder holding ICIAR2018_BACH_Challenge/"
            )
        self.photos = find_photos(self.root)
        self.file_root = self.photos.parent
        files = list_class_files(self.photos, self.classes)  # names are "Photos/<class>/<file>"
        counts = np.bincount([label for _, label in files], minlength=len(self.classes))
        if counts.tolist() != [BACH_PER_CLASS] * len(self.classes):
            found = ", ".join(f"{c} {n}" for c, n in zip(self.classes, counts))
            raise DatasetError(
                f"{self.photos}: BACH needs the 100 official .tif photos per class for eva's patient-aware split, "
                f"found {found}; point data.root at the unmodified ICIAR2018_BACH_Challenge (for another selection of photos, "
                "lay them out as <split>/<class>/<image> and set data.name: folder)"
            )
        self._files = {split: [files[i] for i in idx] for split, idx in bach_split_indices().items()}
        for split in self.splits:
            validate_split(self.photos, "BACH", split, self.labels(split), self.classes, expected_sizes, "images")

    def _key(self, name: str) -> str:
        # Keys relative to Photos/, so they do not depend on which folder data.root names.
        return super()._key(name.split("/", 1)[1])
