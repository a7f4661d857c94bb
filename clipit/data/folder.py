"""Generic ImageFolder layout: ROOT/<split>/<class>/<image>. Also the on-disk form of the demo data."""

from __future__ import annotations

from pathlib import Path

from clipit.data.base import IMAGE_EXTS, DatasetError, FileListDataset


class ImageFolderDataset(FileListDataset):
    """Classes are the sorted sub-folder names of the first split unless given explicitly."""

    name = "folder"

    def __init__(self, root: str | Path, splits=("train", "val", "test"), classes=None):
        self.root = self.file_root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(
                f"{self.root}: dataset folder not found; set data.root to a folder laid out as <split>/<class>/<image>"
            )
        self.splits = tuple(splits)
        missing = [s for s in self.splits if not (self.root / s).is_dir()]
        if missing:
            raise DatasetError(
                f"{self.root}: missing split folder(s) {missing}; expected <root>/<split>/<class>/<image>"
            )
        found = sorted(p.name for p in (self.root / self.splits[0]).iterdir() if p.is_dir())
        self.classes = tuple(classes) if classes else tuple(found)
        if not self.classes:
            raise DatasetError(f"{self.root / self.splits[0]}: no class folders found")
        self._files = {}
        for split in self.splits:
            files = []
            for label, cls in enumerate(self.classes):
                cls_dir = self.root / split / cls
                if cls_dir.is_dir():
                    files += [
                        (p.relative_to(self.root).as_posix(), label)
                        for p in sorted(cls_dir.iterdir())
                        if p.suffix.lower() in IMAGE_EXTS
                    ]
            if not files:
                raise DatasetError(f"{self.root / split}: no images with extensions {sorted(IMAGE_EXTS)}")
            self._files[split] = files
