"""Generic ImageFolder layout: ROOT/<split>/<class>/<image>. Also the on-disk form of the demo data."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from clipit.data.base import DatasetError, ImageDataset, ImageSample

IMAGE_EXTS = {".png": "png", ".jpg": "jpg", ".jpeg": "jpg", ".tif": "tif", ".tiff": "tif"}


class ImageFolderDataset(ImageDataset):
    """Classes are the sorted sub-folder names of the first split unless given explicitly."""

    name = "folder"

    def __init__(self, root: str | Path, splits=("train", "val", "test"), classes=None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"{self.root}: dataset folder not found; set data.root to a folder laid out as <split>/<class>/<image>")
        self.splits = tuple(splits)
        missing = [s for s in self.splits if not (self.root / s).is_dir()]
        if missing:
            raise DatasetError(f"{self.root}: missing split folder(s) {missing}; expected <root>/<split>/<class>/<image>")
        found = sorted(p.name for p in (self.root / self.splits[0]).iterdir() if p.is_dir())
        self.classes = tuple(classes) if classes else tuple(found)
        if not self.classes:
            raise DatasetError(f"{self.root / self.splits[0]}: no class folders found")
        self._files: dict[str, list[tuple[Path, int]]] = {}
        for split in self.splits:
            files = []
            for label, cls in enumerate(self.classes):
                cls_dir = self.root / split / cls
                if cls_dir.is_dir():
                    files += [(p, label) for p in sorted(cls_dir.iterdir()) if p.suffix.lower() in IMAGE_EXTS]
            if not files:
                raise DatasetError(f"{self.root / split}: no images with extensions {sorted(IMAGE_EXTS)}")
            self._files[split] = files

    def split_size(self, split: str) -> int:
        self.check_split(split)
        return len(self._files[split])

    def sample(self, split: str, index: int) -> ImageSample:
        self.check_split(split)
        path, label = self._files[split][index]
        key = path.relative_to(self.root).with_suffix("").as_posix()
        return ImageSample(key=key, data=path.read_bytes(), ext=IMAGE_EXTS[path.suffix.lower()], label=label)

    def keys(self, split: str) -> list[str]:
        self.check_split(split)
        return [p.relative_to(self.root).with_suffix("").as_posix() for p, _ in self._files[split]]

    def labels(self, split: str) -> np.ndarray:
        self.check_split(split)
        return np.array([label for _, label in self._files[split]], dtype=np.int64)
