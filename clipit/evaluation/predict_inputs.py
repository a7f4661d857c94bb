"""What `clipit predict` reads: image files, folders (recursive), globs, shard sets and whole-slide
images, found up front (so a bad input stops the run before the model does any work) and streamed
as batches of uint8 tiles (never a whole slide, a whole folder or all tiles in memory).

Plain images are brought to the model's input size exactly as the shard loader does (short side
resized, centre crop). An image much larger than a training image (short side over TOO_BIG x a training image's) would lose
its detail in that resize, so it is never predicted whole: it is a slide when openslide can read it, a
grid of tiles with --tile, and otherwise refused with that advice (docs/predict.md).
"""

from __future__ import annotations

import glob
import io
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from clipit.data.base import ImageDecodeError, decode_image, upright_size
from clipit.errors import one_line
from clipit.evaluation.slide import (
    SLIDE_EXTS,
    PlainSlide,
    PredictError,
    iter_tiles,
    open_slide,
    openslide_format,
    slide_mpp,
    tile_side,
    tissue_grid,
)
from clipit.shards.codec import image_field, sample_pixels
from clipit.shards.manifest import load_manifest, split_urls
from clipit.shards.reader import iter_samples
from clipit.training.loader import load_image

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"}
WHOLE_SLIDE_ONLY = SLIDE_EXTS - {".tif", ".tiff"}  # always slides; a tif is a slide only when large
TOO_BIG = 4


@dataclass
class Row:
    """One prediction row: an image, or one tile of a slide (x, y, width, height in level-0 px)."""

    image: str
    x: int
    y: int
    width: int
    height: int


@dataclass
class Resolution:
    """What a tile must be: `input_size` px covering `field_um` µm; `image_limit`: the largest plain image side
    predicted whole. `field_um` is None when the model's training resolution is unknown."""

    input_size: int
    field_um: float | None
    image_limit: int
    field_advice: str = ""


class ImageFiles:
    kind = "images"

    def __init__(self, paths: list[Path]):
        self.paths = paths
        self.name = f"{len(paths)} image(s)"

    def count(self) -> int:
        return len(self.paths)

    def prepare(self, res: Resolution) -> None:
        pass

    def items(self, res: Resolution) -> Iterator[tuple[Row, np.ndarray]]:
        for path in self.paths:
            data = _read(path)
            try:
                array = load_image(data, res.input_size)
            except ImageDecodeError as err:
                raise PredictError(f"{path}: not a usable image ({err}); pass image files (png, jpg, tif)") from None
            width, height = _size(data, path)
            yield Row(str(path), 0, 0, width, height), array


class ShardSet:
    kind = "shards"

    def __init__(self, shard_dir: Path, split: str):
        manifest = load_manifest(shard_dir)
        self.urls = split_urls(shard_dir, split, manifest)
        self.total = int(manifest["splits"][split].get("count", 0))
        self.dir, self.name = shard_dir, f"{shard_dir} ({split})"

    def count(self) -> int:
        return self.total

    def prepare(self, res: Resolution) -> None:
        pass

    def items(self, res: Resolution) -> Iterator[tuple[Row, np.ndarray]]:
        for sample in iter_samples(self.urls):
            where = f"{sample['__url__']}: sample {sample['__key__']}"
            if image_field(sample) is None:
                raise PredictError(f"{where}: no image field; check the set with `clipit shard validate {self.dir}`")
            try:
                pixels = sample_pixels(sample)  # png or raw (clipit/shards/codec.py)
            except ImageDecodeError as err:
                raise PredictError(
                    f"{where}: its image does not decode ({err}); check the set with `clipit shard validate {self.dir}`"
                ) from None
            array = load_image(pixels, res.input_size)
            height, width = pixels.shape[:2]
            yield Row(f"{self.dir}#{sample['__key__']}", 0, 0, width, height), array


class Slide:
    """A whole-slide image (openslide) or, with --tile, a large plain image: opened and its pixel size
    read at discovery; the tissue grid is found when it is streamed."""

    kind = "slide"

    def __init__(self, path: Path, mpp_override: float | None, plain: bool, min_tissue: float):
        self.path, self.name, self.plain, self.min_tissue = path, str(path), plain, min_tissue
        if plain and mpp_override is None:
            raise PredictError(
                f"{path}: a plain image records no reliable pixel size; with --tile pass --mpp "
                "MICRONS_PER_PIXEL (e.g. 0.5 for a 20x image)"
            )
        slide = self._open()
        try:
            self.mpp = slide_mpp(slide, path, mpp_override)
        finally:
            slide.close()
        self.grid, self.handle = None, None

    def _open(self):
        if not self.plain:
            return open_slide(self.path)
        try:
            return PlainSlide(decode_image(_read(self.path)))
        except ImageDecodeError as err:
            raise PredictError(f"{self.path}: not a usable image ({err})") from None

    def count(self) -> int | None:
        return None if self.grid is None else len(self.grid.cells)

    def prepare(self, res: Resolution) -> None:
        """Open the slide and find its tissue tiles (reads the thumbnail); items() then streams them."""
        if res.field_um is None:
            raise PredictError(f"{self.path}: {res.field_advice}")
        self.handle = self._open()
        self.grid = tissue_grid(self.handle, self.path, tile_side(self.mpp, res.field_um), self.min_tissue)

    def items(self, res: Resolution) -> Iterator[tuple[Row, np.ndarray]]:
        if self.grid is None:
            self.prepare(res)
        try:
            for (x, y), tile in iter_tiles(self.handle, self.grid, res.input_size, self.path):
                yield Row(self.name, x, y, self.grid.side, self.grid.side), tile
        finally:
            self.handle.close()


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise PredictError(f"{path}: cannot read it ({err.strerror or type(err).__name__})") from None


def _size(data: bytes, where) -> tuple[int, int]:
    try:
        with Image.open(io.BytesIO(data)) as img:  # header only
            return upright_size(img)
    except Exception as err:
        raise PredictError(f"{where}: not a usable image ({one_line(err)}); pass image files (png, jpg, tif)") from None


def _members(paths, where: str) -> list[Path]:
    """The image and slide files among `paths` (sorted, each file once however many links lead to it); a
    member that is a dangling link or cannot be read stops the run naming it, rather than being left out."""
    found, seen = [], set()
    for p in sorted(paths):
        if p.suffix.lower() not in IMAGE_EXTS | SLIDE_EXTS or p.is_dir() or _inside_mrxs(p):
            continue
        if not p.exists():
            raise PredictError(f"{p}: a link to nothing ({where}); remove it or point it at an image")
        if not os.access(p, os.R_OK):
            raise PredictError(f"{p}: cannot be read ({where}); fix its permissions or remove it")
        real = p.resolve()
        if real not in seen:
            seen.add(real)
            found.append(p)
    return found


def _glob(pattern: str) -> list[Path]:
    """glob without following symbolic links to folders (`**` over a link loop would never end, and
    glob.glob follows them): pathlib's matching below the pattern's fixed prefix."""
    parts = Path(pattern).parts
    first = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    base = Path(*parts[:first]) if first else Path()
    return list(base.glob(str(Path(*parts[first:]))))


def _expand(arg: str) -> list[Path]:
    """An argument -> paths: the path itself, a folder's image and slide files (recursive, sorted), or a glob."""
    path = Path(arg)
    if path.is_dir():
        if (path / "manifest.json").exists():
            return [path]
        visible = (p for p in path.rglob("*") if not any(part.startswith(".") for part in p.relative_to(path).parts))
        found = _members(visible, f"in folder {path}")
        if not found:
            raise PredictError(
                f"{path}: a folder with no image or slide files ({', '.join(sorted(IMAGE_EXTS | SLIDE_EXTS))})"
            )
        return found
    if path.exists():
        return [path]
    if glob.has_magic(arg):
        matched = _glob(arg)
        if not matched:
            raise PredictError(f"{arg}: the pattern matches no file; quote it so that clipit expands it (** recurses)")
        out, seen = [], set()
        for p in sorted(matched):
            for q in _expand(os.fspath(p)) if p.is_dir() else _members([p], f"matched by {arg}"):
                if q.resolve() not in seen:  # a file reached through two links or folders is predicted once
                    seen.add(q.resolve())
                    out.append(q)
        return out
    if path.is_symlink():
        raise PredictError(f"{arg}: a link to nothing; pass image files, folders, globs, shard sets or slides")
    raise PredictError(f"{arg}: no such file or folder; pass image files, folders, globs, shard sets or slides")


def _inside_mrxs(path: Path) -> bool:
    """A MIRAX slide's data folder (next to its .mrxs) holds .dat/.ini files only, but skip it explicitly."""
    return path.parent.with_suffix(".mrxs").exists()


def discover(
    inputs: list[str],
    res: Resolution,
    split: str = "test",
    mpp: float | None = None,
    tile: bool = False,
    min_tissue: float = 0.5,
) -> list:
    """The sources to predict, in argument order; consecutive plain images form one source (batched together)."""
    sources: list = []
    images: list[Path] = []

    def add(source) -> None:
        if images:
            sources.append(ImageFiles(images[:]))
            images.clear()
        sources.append(source)

    for arg in inputs:
        for path in _expand(arg):
            if path.is_dir():
                add(ShardSet(path, split))
                continue
            kind = classify(path, res.image_limit, tile)
            if kind == "image":
                images.append(path)
            else:
                add(Slide(path, mpp, plain=kind == "plain-slide", min_tissue=min_tissue))
    if images:
        sources.append(ImageFiles(images))
    return sources


def classify(path: Path, image_limit: int, tile: bool) -> str:
    """image | slide | plain-slide, or a refusal for a big image nothing can tile. `image_limit` bounds the
    short side (the side the loader resizes to the input size)."""
    suffix = path.suffix.lower()
    if suffix in WHOLE_SLIDE_ONLY:
        return "slide"
    if suffix not in IMAGE_EXTS:
        raise PredictError(
            f"{path}: unknown file type {suffix or '(none)'}; pass images ({', '.join(sorted(IMAGE_EXTS))})"
            f" or slides ({', '.join(sorted(WHOLE_SLIDE_ONLY))})"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # decode_image refuses those in one line
            with Image.open(path) as img:  # header only: the size decides
                width, height = upright_size(img)
    except Exception:
        return "slide" if openslide_format(path) else "image"  # the decode while streaming names the problem
    if min(width, height) <= image_limit:
        return "image"
    if openslide_format(path):
        return "slide"
    if tile:
        return "plain-slide"
    if width * height > Image.MAX_IMAGE_PIXELS:
        return "image"  # decode_image refuses it as a decompression bomb, with its own advice
    raise PredictError(
        f"{path}: {width}x{height} px is over {TOO_BIG}x the size the model was trained on; resized "
        "into one input it would lose its detail. Pass --tile (with --mpp) to predict it tile by tile, "
        "or a whole-slide file openslide can read (a tif becomes a slide when openslide opens it)"
    )


def batches(source, res: Resolution, batch_size: int) -> Iterator[tuple[list[Row], np.ndarray]]:
    """(rows, uint8 [B, S, S, 3]) in order; only one batch of pixels exists at a time."""
    rows: list[Row] = []
    arrays: list[np.ndarray] = []
    for row, array in source.items(res):
        rows.append(row)
        arrays.append(array)
        if len(rows) == batch_size:
            yield rows, np.stack(arrays)
            rows, arrays = [], []
    if rows:
        yield rows, np.stack(arrays)
