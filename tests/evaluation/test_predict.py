"""`clipit predict` on what users have: the real CMU-1 slide (one row per tissue tile, heatmap, features),
folders, globs and shard sets (the same numbers for the same image), large plain images (refused or
tiled), bad inputs (one line, exit 2), and memory that stays flat over 1,000 images."""

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from clipit.cli import main
from clipit.data.demo import DEMO_CLASSES
from clipit.data.folder import ImageFolderDataset
from clipit.evaluation.slide import TRAINING_FIELD_UM, open_slide, tissue_grid
from clipit.shards.writer import write_manifest, write_split_shards
from clipit_testing import ROOT, assert_refused, cli

CLASSES = list(DEMO_CLASSES)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def probabilities(rows):
    return np.array([[float(r[c]) for c in CLASSES] for r in rows])


def noise_png(path, size, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def test_cmu1_slide_gives_a_row_per_tissue_tile_a_heatmap_and_features(demo_export, cmu1_slide, tmp_path, capsys):
    slide = tmp_path / "CMU-1-region.svs"
    shutil.copy(cmu1_slide, slide)
    out, feats = tmp_path / "out" / "cmu1.csv", tmp_path / "out" / "cmu1.safetensors"
    assert main(["predict", str(demo_export), str(slide), "--out", str(out), "--features", str(feats)]) == 0
    rows = read_csv(out)
    handle = open_slide(slide)
    grid = tissue_grid(handle, slide, 224, 0.5)  # the demo model's 112 µm field at the slide's 0.499 µm/px
    assert len(rows) == len(grid.cells) > 20
    assert {(int(r["x"]), int(r["y"])) for r in rows} == {grid.origin(i) for i in range(len(grid.cells))}
    width, height = handle.dimensions
    for r in rows:
        assert r["image"] == str(slide) and r["width"] == r["height"] == "224"
        assert 0 <= int(r["x"]) <= width - 224 and 0 <= int(r["y"]) <= height - 224
    p = probabilities(rows)
    np.testing.assert_allclose(p.sum(1), 1, atol=1e-4)
    assert [r["prediction"] for r in rows] == [CLASSES[i] for i in p.argmax(1)]
    heatmap = out.with_name("cmu1.CMU-1-region.heatmap.png")
    with Image.open(heatmap) as png:
        png.verify()
        assert png.format == "PNG"
    with safe_open(str(feats), "np") as f:
        vectors = f.get_tensor("features")
        assert json.loads(f.metadata()["classes"]) == CLASSES
    assert vectors.shape == (len(rows), 96) and np.isfinite(vectors).all()
    printed = capsys.readouterr().out
    assert f"{len(rows)} tissue tiles" in printed and str(heatmap) in printed
    assert TRAINING_FIELD_UM["demo"] == 112.0


def test_folders_globs_and_shard_sets_agree(demo_export, tmp_path):
    images = tmp_path / "images"
    files = [noise_png(images / "test" / CLASSES[i % 4] / f"img{i}.png", 64 + 16 * (i % 2), i) for i in range(8)]
    Image.open(files[0]).convert("RGB").save(images / "test" / "extra.jpg", quality=95)
    (images / "test" / "notes.txt").write_text("not an image: a folder's other files are skipped")

    assert main(["predict", str(demo_export), str(images), "--out", str(tmp_path / "folder.csv")]) == 0
    folder = read_csv(tmp_path / "folder.csv")
    assert [r["image"] for r in folder] == sorted(str(p) for p in [*files, images / "test" / "extra.jpg"])
    assert {(r["width"], r["height"]) for r in folder if r["image"].endswith(".png")} == {("64", "64"), ("80", "80")}

    pattern = str(images / "**" / "img[0-3].png")
    assert main(["predict", str(demo_export), pattern, "--out", str(tmp_path / "glob.json")]) == 0
    globbed = json.loads((tmp_path / "glob.json").read_text())
    assert [r["image"] for r in globbed] == sorted(str(p) for p in files[:4])

    dataset = ImageFolderDataset(images, splits=("test",), classes=CLASSES)
    rng = np.random.default_rng(0)
    pairs = {"indices": rng.integers(0, 3, (8, 1)), "scores": rng.random((8, 1)).astype(np.float32)}
    shards = tmp_path / "shards"
    write_split_shards(dataset, "test", pairs, rng.normal(size=(3, 8)).astype(np.float32), ["a", "b", "c"], shards, 3)
    write_manifest(dataset, shards, 3, 8, {"model": "test"})
    assert main(["predict", str(demo_export), str(shards), "--out", str(tmp_path / "shards.csv")]) == 0
    from_shards = read_csv(tmp_path / "shards.csv")
    assert len(from_shards) == 8 and all(r["image"].startswith(f"{shards}#test_") for r in from_shards)
    # the same images through the folder and through the shards: the same decode, the same numbers
    by_name = {r["image"]: r for r in folder}
    by_bytes = {f.read_bytes(): str(f) for f in files}
    want = probabilities([by_name[by_bytes[dataset.sample("test", i).data]] for i in range(8)])
    np.testing.assert_allclose(probabilities(from_shards), want, atol=1e-5)


def test_large_plain_image_is_refused_or_tiled(demo_export, tmp_path, capsys):
    big = tmp_path / "big.png"
    rgb = np.full((600, 600, 3), 242, np.uint8)
    rgb[:, :320] = (214, 120, 170)  # the left half stained
    Image.fromarray(rgb).save(big)
    assert main(["predict", str(demo_export), str(big)]) == 2
    err = capsys.readouterr().err
    assert "big.png: 600x600 px" in err and "--tile" in err and len(err.strip().splitlines()) == 1
    assert main(["predict", str(demo_export), str(big), "--tile", "--out", str(tmp_path / "t.csv")]) == 2
    assert "--mpp" in capsys.readouterr().err
    # 1.75 µm/px: a 64 px tile is the demo's 112 µm field; 9 x 9 tiles, the 5 left columns are tissue
    assert (
        main(["predict", str(demo_export), str(big), "--tile", "--mpp", "1.75", "--out", str(tmp_path / "t.csv")]) == 0
    )
    rows = read_csv(tmp_path / "t.csv")
    assert sorted({int(r["x"]) for r in rows}) == [0, 64, 128, 192, 256] and len(rows) == 5 * 9
    assert (tmp_path / "t.big.heatmap.png").stat().st_size > 0


@pytest.mark.parametrize("case", ["not-an-image", "missing", "empty-glob", "bad-out", "unreadable-slide", "bad-flag"])
def test_bad_input_is_one_line(demo_export, tmp_path, case, capsys):
    if case == "unreadable-slide":
        pytest.importorskip("openslide", reason="openslide-python + openslide-bin not installed (pip install '.[wsi]')")
    (tmp_path / "x.png").write_text("plain text, not a PNG")
    (tmp_path / "s.svs").write_bytes(b"")
    args, needle = {
        "not-an-image": ([str(tmp_path / "x.png")], "x.png: not a usable image"),
        "missing": ([str(tmp_path / "nope.png")], "nope.png: no such file"),
        "empty-glob": ([str(tmp_path / "*.jpg")], "matches no file"),
        "bad-out": (
            [str(noise_png(tmp_path / "a.png", 64, 0)), "--out", str(tmp_path / "o.txt")],
            "write .csv or .json",
        ),
        "unreadable-slide": (
            [str(tmp_path / "s.svs"), "--out", str(tmp_path / "o.csv")],
            "s.svs: openslide cannot read",
        ),
        "bad-flag": ([str(tmp_path / "x.png"), "--min-tissue", "2"], "--min-tissue 2.0: must be a fraction"),
    }[case]
    assert main(["predict", str(demo_export), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "o.csv").exists()


def test_slide_needs_out_and_a_known_resolution(demo_export, cmu1_slide, tmp_path, capsys):
    assert main(["predict", str(demo_export), str(cmu1_slide)]) == 2
    assert "one row per tissue tile; pass --out" in capsys.readouterr().err
    # a version-1 export (no dataset resolution of its own) whose training run is not around: resolution unknown
    moved = tmp_path / "moved-export"
    shutil.copytree(demo_export, moved)
    config = json.loads((moved / "config.json").read_text())
    config["source_run"] = str(tmp_path / "elsewhere")
    for key in ("dataset", "field_um", "input_mpp"):
        del config[key]
    (moved / "config.json").write_text(json.dumps(config | {"version": 1}))
    out = tmp_path / "o.csv"
    assert main(["predict", str(moved), str(cmu1_slide), "--out", str(out)]) == 2
    assert "pass --target-mpp" in capsys.readouterr().err and not out.exists()
    # 1.75 µm per input px x 64 px = the demo's 112 µm: the same 224 px tiles
    assert main(["predict", str(moved), str(cmu1_slide), "--out", str(out), "--target-mpp", "1.75"]) == 0
    rows = read_csv(out)
    assert {r["width"] for r in rows} == {"224"} and len(rows) == len(
        tissue_grid(open_slide(cmu1_slide), cmu1_slide, 224, 0.5).cells
    )


def test_copied_export_predicts_a_slide_alone(demo_export, cmu1_slide, tmp_path):
    """An export copied to a fresh folder, its training run gone: config.json's dataset resolution gives
    the tile size, no --target-mpp (the demo's 112 µm field at 0.499 µm/px: 224 px tiles)."""
    copy = tmp_path / "fresh" / "model"
    shutil.copytree(demo_export, copy)
    config = json.loads((copy / "config.json").read_text())
    assert (config["dataset"], config["field_um"], config["input_mpp"]) == ("demo", 112.0, 1.75)
    (copy / "config.json").write_text(json.dumps(config | {"source_run": str(tmp_path / "gone")}))
    out = tmp_path / "cmu1.csv"
    assert main(["predict", str(copy), str(cmu1_slide), "--out", str(out)]) == 0
    rows = read_csv(out)
    assert {r["width"] for r in rows} == {"224"} and len(rows) == len(
        tissue_grid(open_slide(cmu1_slide), cmu1_slide, 224, 0.5).cells
    )


def test_bad_input_fault_contract_in_a_real_process(demo_export, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    proc = cli("predict", str(demo_export), str(tmp_path / "broken.png"), "--out", str(tmp_path / "out.csv"))
    assert_refused(proc, tmp_path, "broken.png", absent=["out.csv"])


MEMORY_SCRIPT = """
import sys, time, tracemalloc
from pathlib import Path
import torch
from clipit.evaluation.inference import run_predict
torch.set_num_threads(1)  # one thread: torch's spinning threads crawl on a loaded 2-core machine
model, folder, out = sys.argv[1:4]
files = sorted(Path(folder).glob("*.png"))
tracemalloc.start()
peaks = []
for n in (100, len(files)):
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    run_predict(model, [str(f) for f in files[:n]], out=f"{out}-{n}.csv", features=f"{out}-{n}.safetensors",
                batch_size=50)
    peaks.append(tracemalloc.get_traced_memory()[1] - base)
print(*peaks, time.process_time())
"""


def test_memory_stays_flat_over_a_thousand_images(demo_export, tmp_path):
    folder = tmp_path / "tiles"
    for i in range(1000):
        noise_png(folder / f"t{i:04d}.png", 16, i)  # decoded, each is a 64 px (12 KiB) tile
    proc = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(demo_export), str(folder), str(tmp_path / "out")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    peak_100, peak_1000 = map(int, proc.stdout.split()[-3:-1])
    # holding the decoded tiles alone would add 900 x 12 KiB = 10.5 MiB for the longer run
    assert peak_1000 - peak_100 < 3 * 2**20, (peak_100, peak_1000)
    assert len(read_csv(tmp_path / "out-1000.csv")) == 1000
