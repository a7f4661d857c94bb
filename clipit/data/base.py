"""The image-dataset interface every reader implements, and the base of the readers that list files.

A dataset is random-access by (split, index) so that shard building can be cut into independent
parts (one per array task) without reading anything twice. Samples carry the image bytes *as stored*
(PNG/JPEG/TIFF) so shards never re-encode what is already encoded.

`FileListDataset` is the common part of the readers whose samples are image files (CRC, BACH, the
generic folder): each lists (file name, label) per split once, at construction; sizes, keys, labels
and reading the bytes follow from that list.
"""
from __future__ import annotations

import abc
import io
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator

import numpy as np
from PIL import Image

from clipit.errors import ClipitError

IMAGE_EXTS = {".png": "png", ".jpg": "jpg", ".jpeg": "jpg", ".tif": "tif", ".tiff": "tif"}  # suffix -> field name


class DatasetError(ClipitError):
    """A dataset on disk does not look like what its reader expects (one line, names the fix)."""


@dataclass(frozen=True)
class ImageSample:
    key: str  # stable and unique within the dataset, e.g. "train/ADI/ADI-AAAFLCLY.tif"
    data: bytes  # the encoded image, byte for byte as stored
    ext: str  # "png", "jpg", "tif": the WebDataset field name the bytes go under
    label: int


class ImageDataset(abc.ABC):
    """Random-access, split-aware image dataset."""

    name: str = "dataset"
    classes: tuple[str, ...] = ()
    splits: tuple[str, ...] = ("train", "val", "test")

    @abc.abstractmethod
    def split_size(self, split: str) -> int: ...

    @abc.abstractmethod
    def sample(self, split: str, index: int) -> ImageSample: ...

    def iter_split(self, split: str, start: int = 0, stop: int | None = None) -> Iterator[ImageSample]:
        stop = self.split_size(split) if stop is None else min(stop, self.split_size(split))
        for index in range(start, stop):
            yield self.sample(split, index)

    def keys(self, split: str) -> list[str]:
        """All sample keys of a split; readers override this when keys are cheaper than images."""
        return [self.sample(split, i).key for i in range(self.split_size(split))]

    def labels(self, split: str) -> np.ndarray:
        """All labels of a split; readers override this when labels are cheaper than images."""
        return np.array([self.sample(split, i).label for i in range(self.split_size(split))], dtype=np.int64)

    def check_split(self, split: str) -> None:
        if split not in self.splits:
            raise DatasetError(f"{self.name}: unknown split {split!r}; choose one of {list(self.splits)}")


class FileListDataset(ImageDataset):
    """A dataset of image files, listed per split when the reader is built.

    Subclasses set `file_root` and fill `_files[split]` with (name, label) pairs in split order; a name
    is a "/"-separated path under `file_root` whose suffix is one of IMAGE_EXTS. A sample's key is its
    name without the suffix (`_key` may drop more)."""

    file_root: Path
    _files: dict[str, list[tuple[str, int]]]

    def _key(self, name: str) -> str:
        return name.rsplit(".", 1)[0]

    def split_size(self, split: str) -> int:
        self.check_split(split)
        return len(self._files[split])

    def sample(self, split: str, index: int) -> ImageSample:
        self.check_split(split)
        name, label = self._files[split][index]
        path = self.file_root / name
        try:
            data = path.read_bytes()
        except OSError as err:
            raise DatasetError(f"{path}: cannot read ({type(err).__name__}); check the file and its permissions") from None
        return ImageSample(key=self._key(name), data=data, ext=IMAGE_EXTS[PurePosixPath(name).suffix.lower()],
                           label=label)

    def keys(self, split: str) -> list[str]:
        self.check_split(split)
        return [self._key(name) for name, _ in self._files[split]]

    def labels(self, split: str) -> np.ndarray:
        self.check_split(split)
        return np.array([label for _, label in self._files[split]], dtype=np.int64)


def decode_image(data: bytes) -> Image.Image:
    """Decode stored bytes to an RGB PIL image (TIFF, PNG and JPEG alike)."""
    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")


def encode_png(array: np.ndarray) -> bytes:
    """Losslessly encode an HxWx3 uint8 array (for sources stored as raw arrays, e.g. PCAM h5)."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
