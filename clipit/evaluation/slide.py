"""Whole-slide images for `clipit predict`: open (openslide, or a plain image with --tile), pixel size,
tissue on a thumbnail, the tile grid at the model's training resolution, tiles read one at a time,
and the heatmap over the thumbnail.

Resolution. A tile covers the same field of view as one training image did after the loader brought it
to the model's input size (short side resized, centre crop): TRAINING_FIELD_UM per dataset (sources in
docs/predict.md). A tile is field / slide_mpp level-0 pixels wide, read at the pyramid level just finer
than needed and resized to the input size, so the model sees µm per pixel = field / input size.

Tissue. Saturation of the thumbnail, Otsu threshold (bounded, so a slide that is nearly all tissue is not
split in two, and empty glass finds nothing); a tile is tissue when at least `min_tissue` of its
thumbnail pixels are. Partial tiles at the right and bottom edge are skipped.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from clipit.errors import ClipitError, one_line
from clipit.io import atomic_path

# Field of view (µm) of one training image as the model saw it (the loader's centre square).
TRAINING_FIELD_UM = {
    "pcam": 96 * 0.243 * 4,  # 96 px at 10x: Camelyon16's 40x (0.243 µm/px) downsampled 4x -> 93.3 µm
    "crc": 224 * 0.5,  # NCT-CRC-HE-100K: 224 px at 0.5 µm/px -> 112 µm
    "bach": 1536 * 0.42,  # BACH photos 2048x1536 at 0.42 µm/px; the centre 1536 square -> 645 µm
    "demo": 112.0,  # synthetic, drawn at the CRC tile's field (lymphocyte nuclei ~4 of 64 px)
}
# Short side (px) of a training image (the side the loader resizes to the input size): a plain image whose
# short side is up to 4x this is predicted whole, as training did.
TRAINING_SIDE_PX = {"pcam": 96, "crc": 224, "bach": 1536}
SLIDE_EXTS = {".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".tif", ".tiff", ".dcm"}
MPP_RANGE = (0.05, 50.0)  # µm/px a scan can have; outside it a resolution tag is a placeholder (e.g. 72 dpi)
SATURATION_BOUNDS = (15, 60)  # Otsu threshold clamp (0-255): glass is below 15, pale eosin above 60
WSI_INSTALL = "pip install 'clipit[wsi]' (openslide-python + openslide-bin)"


class PredictError(ClipitError):
    """An input `clipit predict` cannot use (one line: the file and the fix). Raised by every predict module."""


def openslide_module():
    try:
        import openslide
    except ImportError as err:
        raise PredictError(f"whole-slide images need openslide ({one_line(err)}); {WSI_INSTALL}") from None
    return openslide


def openslide_format(path: Path) -> str | None:
    """The openslide vendor that can read `path` ('aperio', 'generic-tiff', ...), None if none or no openslide."""
    try:
        import openslide
    except ImportError:
        return None
    try:
        return openslide.OpenSlide.detect_format(str(path))
    except Exception:
        return None


class PlainSlide:
    """A decoded plain image behind the few openslide calls used here (one level; --tile)."""

    level_count, level_downsamples, properties = 1, (1.0,), {}

    def __init__(self, image: Image.Image):
        self.image = image
        self.dimensions = image.size
        self.level_dimensions = (image.size,)

    def get_best_level_for_downsample(self, downsample: float) -> int:
        return 0

    def get_thumbnail(self, size) -> Image.Image:
        thumb = self.image.copy()
        thumb.thumbnail(size, Image.BILINEAR)
        return thumb

    def read_region(self, location, level, size) -> Image.Image:
        x, y = location
        return self.image.crop((x, y, x + size[0], y + size[1]))

    def close(self) -> None:
        self.image.close()


MAX_THUMBNAIL_SOURCE_PX = 1 << 28  # 268M px (1 GiB as RGBA): the largest level read whole for a thumbnail


def open_slide(path: Path):
    openslide = openslide_module()
    try:
        return openslide.OpenSlide(str(path))
    except Exception as err:
        raise PredictError(
            f"{path}: openslide cannot read it ({one_line(err)}); pass a slide openslide supports "
            "(svs, ndpi, mrxs, scn, tiled tif, ...) or export a region as png"
        ) from None


def slide_mpp(slide, path: Path, override: float | None) -> float:
    """µm per level-0 pixel: --mpp, else openslide.mpp-x/y, else the TIFF resolution tags."""
    if override is not None:
        return float(override)
    props = slide.properties
    values = []
    for key in ("openslide.mpp-x", "openslide.mpp-y"):
        try:
            values.append(float(props[key]))
        except (KeyError, ValueError):
            pass
    if not values:
        per_unit = {"centimeter": 1e4, "inch": 25400.0}.get(str(props.get("tiff.ResolutionUnit", "")).lower())
        try:
            values = [per_unit / float(props["tiff.XResolution"])] if per_unit else []
        except (KeyError, ValueError, ZeroDivisionError):
            values = []
    mpp = float(np.mean(values)) if values else math.nan
    if not MPP_RANGE[0] <= mpp <= MPP_RANGE[1]:
        found = f"it records {mpp:g} µm/px" if values else "it records no pixel size (openslide.mpp-x, TIFF resolution)"
        raise PredictError(
            f"{path}: {found}; pass --mpp MICRONS_PER_PIXEL of its level 0 (e.g. 0.25 for a 40x scan, 0.5 for 20x)"
        )
    return mpp


def otsu_threshold(values: np.ndarray) -> int:
    """Otsu's threshold of uint8 values: the split maximising the between-class variance."""
    hist = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    p = hist / max(hist.sum(), 1.0)
    omega, mu = np.cumsum(p), np.cumsum(p * np.arange(256))
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu[-1] * omega - mu) ** 2 / (omega * (1 - omega))
    return int(np.argmax(np.nan_to_num(between)))


def tissue_mask(rgb: np.ndarray) -> np.ndarray:
    """Boolean tissue mask of an RGB uint8 thumbnail: saturated (stained) and not black."""
    rgb = rgb.astype(np.int32)
    hi, lo = rgb.max(axis=-1), rgb.min(axis=-1)
    saturation = ((hi - lo) * 255 // np.maximum(hi, 1)).astype(np.uint8)
    threshold = int(np.clip(otsu_threshold(saturation), *SATURATION_BOUNDS))
    return (saturation > threshold) & (hi > 40)


@dataclass
class TileGrid:
    side: int  # tile side in level-0 px
    width: int  # level-0 size of the slide
    height: int
    cols: int
    rows: int
    cells: np.ndarray  # [n, 2] int (col, row) of the tissue tiles, row-major order
    thumbnail: Image.Image  # for the heatmap

    def origin(self, i: int) -> tuple[int, int]:
        col, row = self.cells[i]
        return int(col) * self.side, int(row) * self.side


def tile_side(mpp: float, field_um: float) -> int:
    return max(1, round(field_um / mpp))


def tissue_grid(slide, path: Path, side: int, min_tissue: float) -> TileGrid:
    width, height = slide.dimensions
    cols, rows = width // side, height // side
    if cols == 0 or rows == 0:
        raise PredictError(
            f"{path}: {width}x{height} px is smaller than one tile ({side} px at the model's "
            "resolution); predict it as an image, or check --mpp / --target-mpp"
        )
    limit = min(4096, max(1024, 8 * max(cols, rows)))  # >= ~8 thumbnail px per tile, bounded memory
    # openslide makes the thumbnail from the level nearest to it, read whole: a slide without small enough
    # levels (or a header that claims 200000² px) would need gigabytes, so such a level is refused first
    level = slide.get_best_level_for_downsample(max(width, height) / limit)
    level_w, level_h = slide.level_dimensions[level]
    if level_w * level_h > MAX_THUMBNAIL_SOURCE_PX:
        raise PredictError(
            f"{path}: its coarsest usable level is {level_w}x{level_h} px, too large to read whole for the tissue "
            f"map (limit {MAX_THUMBNAIL_SOURCE_PX:,} px); the slide lacks a pyramid: re-save it as a tiled, "
            "pyramidal TIFF (e.g. vips tiffsave --tile --pyramid) or check that its header is intact"
        )
    thumb = read_pixels(path, lambda: slide.get_thumbnail((limit, limit)).convert("RGB"))
    mask = tissue_mask(np.asarray(thumb))
    # Each thumbnail pixel -> the tile it falls in; pixels of partial edge tiles are dropped.
    col_of = (np.arange(thumb.width) * width / thumb.width // side).astype(np.int64)
    row_of = (np.arange(thumb.height) * height / thumb.height // side).astype(np.int64)
    inside = (row_of[:, None] < rows) & (col_of[None, :] < cols)
    index = (row_of[:, None] * cols + col_of[None, :])[inside]
    total = np.bincount(index, minlength=rows * cols)
    hits = np.bincount(index, weights=mask[inside], minlength=rows * cols)
    fraction = np.divide(hits, total, out=np.zeros(rows * cols), where=total > 0)
    tissue = np.flatnonzero(fraction >= min_tissue)
    cells = np.stack([tissue % cols, tissue // cols], axis=1)
    return TileGrid(side, width, height, cols, rows, cells, thumb)


def read_tile(slide, x: int, y: int, side: int, size: int) -> np.ndarray:
    """uint8 size x size RGB of the level-0 square (x, y, side), read at the finest level needed."""
    level = slide.get_best_level_for_downsample(side / size)
    extent = max(1, round(side / slide.level_downsamples[level]))
    region = slide.read_region((x, y), level, (extent, extent))
    if region.mode != "RGB":  # openslide gives RGBA: transparent outside the scanned area -> white glass
        white = Image.new("RGB", region.size, (255, 255, 255))
        white.paste(region, mask=region.getchannel("A") if "A" in region.getbands() else None)
        region = white
    if region.size != (size, size):
        region = region.resize((size, size), Image.BILINEAR, reducing_gap=2.0)
    return np.asarray(region, dtype=np.uint8)


def iter_tiles(slide, grid: TileGrid, size: int, path: Path) -> Iterator[tuple[tuple[int, int], np.ndarray]]:
    for i in range(len(grid.cells)):
        x, y = grid.origin(i)
        yield (x, y), read_pixels(path, functools.partial(read_tile, slide, x, y, grid.side, size), f" at ({x}, {y})")


def read_pixels(path: Path, read, where: str = ""):
    """`read()`, with openslide's errors on a damaged or truncated file (OpenSlideError, a failed tile
    decode) as one line naming the slide; a clipit error passes through."""
    try:
        return read()
    except PredictError:
        raise
    except Exception as err:  # MemoryError included: a damaged header can claim any size
        raise PredictError(
            f"{path}: openslide cannot read its pixels{where} ({one_line(err)}); the file is truncated or damaged: "
            "copy it again from its source"
        ) from None


def save_heatmap(
    path: Path, grid: TileGrid, probs: np.ndarray, classes: list[str], title: str, heatmap_class: str | None = None
) -> Path:
    """PNG of the thumbnail with one coloured cell per tissue tile: the predicted class (opacity grows with
    its probability), or with `heatmap_class` that class's probability on a colour scale."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    overlay = np.zeros((grid.rows, grid.cols, 4), np.float32)
    cols, rows = grid.cells[:, 0], grid.cells[:, 1]
    fig = Figure(figsize=(8, 8 * grid.thumbnail.height / grid.thumbnail.width + 0.8), dpi=150)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.imshow(grid.thumbnail)
    right = grid.cols * grid.side * grid.thumbnail.width / grid.width  # the grid in thumbnail pixels
    bottom = grid.rows * grid.side * grid.thumbnail.height / grid.height
    if heatmap_class is not None:
        cmap = colormaps["inferno"]
        values = probs[:, classes.index(heatmap_class)] if len(probs) else np.zeros(0)
        overlay[rows, cols] = cmap(values)
        overlay[rows, cols, 3] = 0.6
        image = ax.imshow(overlay, extent=(0, right, bottom, 0), interpolation="nearest", cmap=cmap, vmin=0, vmax=1)
        fig.colorbar(image, ax=ax, fraction=0.04, label=f"P({heatmap_class})")
    else:
        palette = colormaps["tab10" if len(classes) <= 10 else "tab20"]
        if len(probs):
            overlay[rows, cols] = palette(probs.argmax(1) % palette.N)
            overlay[rows, cols, 3] = 0.2 + 0.6 * probs.max(1)
        ax.imshow(overlay, extent=(0, right, bottom, 0), interpolation="nearest")
        ax.legend(
            handles=[Patch(color=palette(i % palette.N), label=c) for i, c in enumerate(classes)],
            loc="upper left",
            bbox_to_anchor=(1.01, 1),
            fontsize=8,
            title="prediction",
        )
    ax.set_xlim(0, grid.thumbnail.width)
    ax.set_ylim(grid.thumbnail.height, 0)
    ax.set_axis_off()
    ax.set_title(f"{title}: {len(grid.cells)} tissue tiles", fontsize=9)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    return path
