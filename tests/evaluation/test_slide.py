"""Slides for `clipit predict`: pixel size, tissue on the thumbnail, the tile grid, tiles and the heatmap,
on generated images and on the real CMU-1 region (Aperio SVS, read by openslide)."""

import numpy as np
import pytest
from PIL import Image

from clipit.evaluation.slide import (
    TRAINING_FIELD_UM,
    PlainSlide,
    PredictError,
    open_slide,
    otsu_threshold,
    read_tile,
    save_heatmap,
    slide_mpp,
    tile_side,
    tissue_grid,
    tissue_mask,
)

GLASS, EOSIN = (242, 241, 245), (214, 120, 170)


def glass_with_tissue(width: int, height: int, boxes) -> Image.Image:
    """Near-white glass with pink (stained) rectangles (x0, y0, x1, y1)."""
    rgb = np.empty((height, width, 3), np.uint8)
    rgb[:] = GLASS
    for x0, y0, x1, y1 in boxes:
        rgb[y0:y1, x0:x1] = EOSIN
    return Image.fromarray(rgb)


def test_otsu_splits_two_populations():
    values = np.concatenate([np.full(500, 10, np.uint8), np.full(300, 120, np.uint8)])
    assert 10 <= otsu_threshold(values) < 120


def test_tissue_mask_finds_stain_not_glass_or_black():
    image = np.asarray(glass_with_tissue(100, 100, [(20, 20, 60, 60)])).copy()
    image[80:, 80:] = 0  # black: a scanner's border, not tissue
    mask = tissue_mask(image)
    assert mask[20:60, 20:60].all() and mask.sum() == 40 * 40


def test_grid_keeps_tiles_with_enough_tissue():
    # 400 x 300 px, 100 px tiles: tile (1, 0) is all tissue, tile (2, 1) a quarter, the rest glass
    slide = PlainSlide(glass_with_tissue(400, 300, [(100, 0, 200, 100), (250, 150, 300, 200)]))
    grid = tissue_grid(slide, "x.png", 100, min_tissue=0.5)
    assert (grid.cols, grid.rows) == (4, 3) and grid.cells.tolist() == [[1, 0]]
    assert tissue_grid(slide, "x.png", 100, min_tissue=0.2).cells.tolist() == [[1, 0], [2, 1]]
    assert grid.origin(0) == (100, 0)
    tile = read_tile(slide, 100, 0, 100, 64)
    assert tile.shape == (64, 64, 3) and tile.dtype == np.uint8 and (np.abs(tile.astype(int) - EOSIN) <= 1).all()
    with pytest.raises(PredictError, match="smaller than one tile"):
        tissue_grid(slide, "x.png", 500, 0.5)


def test_pixel_size_from_tags_or_flag():
    slide = PlainSlide(glass_with_tissue(10, 10, []))
    with pytest.raises(PredictError, match="records no pixel size.*--mpp"):
        slide_mpp(slide, "x.png", None)
    assert slide_mpp(slide, "x.png", 0.25) == 0.25
    slide.properties = {"tiff.ResolutionUnit": "centimeter", "tiff.XResolution": "20000"}  # 0.5 µm/px
    assert slide_mpp(slide, "x.tif", None) == pytest.approx(0.5)
    slide.properties = {"tiff.ResolutionUnit": "inch", "tiff.XResolution": "72"}  # a screen default, not a scan
    with pytest.raises(PredictError, match="records 352.778 µm/px"):
        slide_mpp(slide, "x.tif", None)


def test_cmu1_grid_tiles_and_heatmap(cmu1_slide, tmp_path):
    slide = open_slide(cmu1_slide)
    mpp = slide_mpp(slide, cmu1_slide, None)
    assert mpp == pytest.approx(0.499)
    side = tile_side(mpp, TRAINING_FIELD_UM["demo"])  # 112 µm at 0.499 µm/px
    assert side == 224
    grid = tissue_grid(slide, cmu1_slide, side, 0.5)
    assert (grid.cols, grid.rows) == (2220 // 224, 2967 // 224)
    # the section covers about a third of the region: dozens of tiles, far from all 117
    assert 25 <= len(grid.cells) <= 70, len(grid.cells)
    tile = read_tile(slide, *grid.origin(0), side, 64)
    assert tile.shape == (64, 64, 3) and tissue_mask(tile).mean() > 0.2
    probs = np.random.default_rng(0).dirichlet(np.ones(3), len(grid.cells)).astype(np.float32)
    for name, klass in (("classes.png", None), ("b.png", "b")):
        save_heatmap(tmp_path / name, grid, probs, ["a", "b", "c"], "CMU-1", klass)
        with Image.open(tmp_path / name) as png:
            png.verify()
            assert png.format == "PNG" and min(png.size) > 300
    slide.close()


def test_unreadable_slide_is_one_line(tmp_path):
    pytest.importorskip("openslide", reason="openslide-python + openslide-bin not installed (pip install '.[wsi]')")
    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"II*\x00 not really a slide")
    with pytest.raises(PredictError, match="broken.svs: openslide cannot read it"):
        open_slide(bad)
