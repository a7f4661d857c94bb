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
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, UnidentifiedImageError

from clipit.errors import ClipitError, one_line

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
    fixed_size: bool = False  # every image has one size (shards.codec auto stores such sets raw)

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
            raise DatasetError(
                f"{path}: cannot read ({type(err).__name__}); check the file and its permissions"
            ) from None
        return ImageSample(
            key=self._key(name), data=data, ext=IMAGE_EXTS[PurePosixPath(name).suffix.lower()], label=label
        )

    def keys(self, split: str) -> list[str]:
        self.check_split(split)
        return [self._key(name) for name, _ in self._files[split]]

    def labels(self, split: str) -> np.ndarray:
        self.check_split(split)
        return np.array([label for _, label in self._files[split]], dtype=np.int64)


class ImageDecodeError(DatasetError):
    """Bytes that are no image clipit can use. The message is the reason alone (callers put the file or
    the shard and sample in front of it, and the fix after it)."""


# Modes PIL converts to RGB exactly (one value per channel, no range to guess): 1-bit, 8-bit gray, CMYK, YCbCr.
_DIRECT = {"1", "L", "RGB", "RGBX", "CMYK", "YCbCr"}
_ALPHA = {"LA", "La", "PA", "RGBA", "RGBa"}
_UINT16 = {"I;16", "I;16L", "I;16B", "I;16N"}  # unsigned 16-bit gray, as a mode or as the raw layout of an "I" image


def decode_image(data: bytes) -> Image.Image:
    """Decode stored image bytes fully to an RGB image: the one conversion every stage uses (pairing,
    the shard build's check, the training/evaluation loader, `clipit predict`), so they all see the same
    pixels. Raises ImageDecodeError (one line) for bytes that are not an image, a truncated image, an
    image above PIL's MAX_IMAGE_PIXELS (a decompression bomb is refused, never a warning), and modes
    whose 8-bit scale would be a guess.

    Conversion, by mode:
      1, L, RGB, CMYK, YCbCr  PIL's convert (exact; CMYK/YCbCr by PIL's formulas)
      P                       the palette's colours
      LA, PA, RGBA, and any image with a transparency key (P, L, RGB with tRNS): composited onto white
                              (the glass of a slide; what a transparent pixel stores is undefined, often
                              black), so opaque pixels keep their colour exactly
      I;16 (16-bit gray), 16-bit RGB/RGBA TIFF or PNG: the high byte (v >> 8), i.e. scaled, never clipped;
                              PIL itself reads 16-bit colour that way, so gray and colour agree
      I (32-bit or signed integer), F (float) and other modes: refused, their range is not fixed
    """
    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that; make it the error it is above
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                rawmode = _rawmode(img)
                img.load()
                return upright(_to_rgb(img, rawmode), exif_orientation(img))
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise ImageDecodeError(
            f"too many pixels for PIL ({one_line(str(err))}); a decompression bomb, or an "
            "image that must be cut into tiles or downscaled first"
        ) from None
    except UnidentifiedImageError:
        raise ImageDecodeError("not an image (PIL cannot identify its format)") from None
    except Exception as err:  # PIL raises many types for bad bytes (OSError, SyntaxError, ValueError, struct.error ...)
        raise ImageDecodeError(one_line(err)) from None


# EXIF orientation (tag 0x0112) -> the transpose that shows the image upright (as ImageOps.exif_transpose)
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation a camera or scanner recorded (1 = as stored); unreadable EXIF counts as 1."""
    try:
        value = img.getexif().get(0x0112, 1)
    except Exception:  # a damaged EXIF block must not make a readable image unreadable
        return 1
    return value if value in _UPRIGHT else 1


def upright(img: Image.Image, orientation: int) -> Image.Image:
    """`img` as its EXIF orientation says it is seen (a phone photo of a tile, a rotated JPEG export)."""
    return img.transpose(_UPRIGHT[orientation]) if orientation in _UPRIGHT else img


def upright_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) as seen, from the header alone: orientations 5-8 swap the sides."""
    width, height = img.size
    return (height, width) if exif_orientation(img) in (5, 6, 7, 8) else (width, height)


def _rawmode(img: Image.Image) -> str:
    """How the pixels are laid out in the file (known before load(), which clears the tiles)."""
    tile = getattr(img, "tile", None)
    if not tile:
        return img.mode
    args = tile[0][3]
    return args if isinstance(args, str) else str(args[0]) if isinstance(args, tuple) and args else img.mode


def _to_rgb(img: Image.Image, rawmode: str) -> Image.Image:
    mode = img.mode
    if mode in _ALPHA or (mode in ("P", "L", "RGB") and "transparency" in img.info):
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    if mode in _DIRECT or mode == "P":
        return img.convert("RGB")
    if mode in _UINT16 or (mode == "I" and rawmode in _UINT16):
        values = np.asarray(img)
        if values.size and (values.min() < 0 or values.max() > 65535):  # cannot happen for unsigned 16-bit input
            raise ImageDecodeError(f"16-bit image with values outside 0..65535 ({mode})")
        gray = (values.astype(np.uint32) >> 8).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[..., None], 3, axis=2))
    if mode in ("I", "F"):
        kind = "floating-point" if mode == "F" else "signed or 32-bit integer"
        raise ImageDecodeError(
            f"{kind} gray pixels (PIL mode {mode}, stored as {rawmode}) have no fixed 8-bit "
            "scale; save the image as 8-bit or unsigned 16-bit"
        )
    raise ImageDecodeError(f"PIL mode {mode} is not supported; save the image as RGB")


def worker_error(err: Exception) -> Exception:
    """A DataLoader worker's exception comes back with the worker's traceback in its message (torch
    rebuilds it as `type(err)(text)`): the same exception with the text's last line, so that the CLI still
    prints one line. Other exceptions come back unchanged."""
    text = str(err)
    if "Original Traceback" not in text:
        return err
    name = type(err).__name__
    last = [ln for ln in text.strip().splitlines() if ln.strip()][-1]
    return type(err)(last.split(f"{name}: ", 1)[-1].strip())


def encode_png(array: np.ndarray) -> bytes:
    """Losslessly encode an HxWx3 uint8 array (for sources stored as raw arrays, e.g. PCAM h5)."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
