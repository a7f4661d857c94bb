"""Images of every mode, bit depth and size, and bad images on every path that decodes them: shard
building and pairing (data readers), the training/evaluation loader, `clipit predict`. Real images
written with PIL (and a hand-written 16-bit RGB TIFF, which PIL cannot write), real shards, the real
loader and CLI. Every usable image reaches the model as RGB uint8 at the model's input size; every
other one is one line naming the file (or the shard and sample) and the fix."""

import io
import json
import os
import struct
import subprocess
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from pairing.fakes import make_images, make_reports, pair_with_tiny_model, tiny_model, write_config
from PIL import Image

import clipit.pairing.encoders
from clipit.cli import main
from clipit.data.base import ImageDecodeError, decode_image
from clipit.data.folder import ImageFolderDataset
from clipit.shards.manifest import ShardError, split_urls
from clipit.shards.reader import iter_samples
from clipit.shards.validate import validate_shards
from clipit.shards.writer import write_manifest, write_split_shards
from clipit.training.loader import eval_loader, load_image, train_loader
from clipit_testing import cli

# ---------------------------------------------------------------------------------- image makers


def encode(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def tiff_rgb16(array: np.ndarray) -> bytes:
    """A baseline little-endian TIFF of an H x W x 3 uint16 array (16 bits per channel, uncompressed)."""
    h, w, _ = array.shape
    pixels = array.astype("<u2").tobytes()
    entries = [
        (256, 3, w),
        (257, 3, h),
        (258, 3, None),
        (259, 3, 1),
        (262, 3, 2),
        (273, 4, None),
        (277, 3, 3),
        (278, 3, h),
        (279, 4, len(pixels)),
        (284, 3, 1),
    ]
    bits_at = 8 + 2 + 12 * len(entries) + 4
    data_at = bits_at + 6
    out = bytearray(b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(entries)))
    for tag, kind, value in entries:
        count = 3 if tag == 258 else 1
        value = {258: bits_at, 273: data_at}.get(tag, value)
        field = struct.pack("<HH", value, 0) if kind == 3 and tag != 258 else struct.pack("<I", value)
        out += struct.pack("<HHI", tag, kind, count) + field
    return bytes(out + struct.pack("<I", 0) + struct.pack("<HHH", 16, 16, 16) + pixels)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels (what PIL's decompression-bomb check looks at)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IEND", b"")
    )


GRAY = np.array([[0, 1, 127], [128, 254, 255]], np.uint8)
V16 = np.array([[0, 255, 256], [32896, 65279, 65535]], np.uint16)
PALETTE = [(200, 30, 40), (10, 220, 90), (0, 0, 255)]
INDEX = np.array([[0, 1, 2], [2, 1, 0]], np.uint8)
ALPHA = np.array([[0, 255, 128], [255, 0, 64]], np.uint8)


def gray3(a: np.ndarray) -> np.ndarray:
    return np.repeat(a[..., None], 3, axis=2)


def on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha[..., None].astype(np.float64) / 255
    return np.round(rgb * a + 255 * (1 - a))


def p_image(transparent: int | None = None) -> bytes:
    img = Image.frombytes("P", (3, 2), INDEX.tobytes())
    img.putpalette([c for rgb in PALETTE for c in rgb])
    return encode(img, transparency=transparent) if transparent is not None else encode(img)


def mode_cases():
    rgb = np.stack([GRAY, 255 - GRAY, GRAY // 2], axis=2)
    cmyk = np.stack([GRAY, 255 - GRAY, GRAY // 3, np.zeros_like(GRAY)], axis=2)
    cmyk[1, 2] = (17, 33, 99, 255)
    want_cmyk = (255 - cmyk[..., :3]).astype(np.float64)
    want_cmyk[1, 2] = 0
    palette = np.array(PALETTE, np.uint8)[INDEX]
    transparent = palette.copy()
    transparent[INDEX == 2] = 255
    return {
        "1-bit": (encode(Image.fromarray(GRAY > 127)), gray3(np.where(GRAY > 127, 255, 0)), 0),
        "L": (encode(Image.fromarray(GRAY)), gray3(GRAY), 0),
        "L-tRNS": (encode(Image.fromarray(GRAY), transparency=127), gray3(np.where(GRAY == 127, 255, GRAY)), 0),
        "LA": (
            encode(Image.frombytes("LA", (3, 2), np.stack([GRAY, ALPHA], 2).tobytes())),
            on_white(gray3(GRAY), ALPHA),
            1,
        ),
        "P": (p_image(), palette, 0),
        "P-transparency": (p_image(transparent=2), transparent, 0),
        "RGB-tRNS": (
            encode(Image.fromarray(rgb), transparency=tuple(int(v) for v in rgb[0, 2])),
            np.where((rgb == rgb[0, 2]).all(2, keepdims=True), 255, rgb),
            0,
        ),
        "RGBA": (encode(Image.fromarray(np.dstack([rgb, ALPHA]))), on_white(rgb, ALPHA), 1),
        "CMYK-tiff": (encode(Image.frombytes("CMYK", (3, 2), cmyk.tobytes()), "TIFF"), want_cmyk, 0),
        "I;16-png": (encode(Image.fromarray(V16)), gray3(V16 >> 8), 0),
        "I;16-tiff": (encode(Image.fromarray(V16), "TIFF"), gray3(V16 >> 8), 0),
        "RGB-16bit-tiff": (
            tiff_rgb16(np.stack([V16, 65535 - V16, V16 // 3], axis=2)),
            np.stack([V16 >> 8, (65535 - V16) >> 8, (V16 // 3) >> 8], axis=2),
            0,
        ),
    }


MODES = mode_cases()


# ------------------------------------------------------------------------------- the conversion


@pytest.mark.parametrize("name", list(MODES))
def test_every_mode_converts_to_rgb_uint8(name):
    data, want, tolerance = MODES[name]
    got = np.asarray(decode_image(data))
    assert got.dtype == np.uint8 and got.shape == (2, 3, 3)
    assert np.abs(got.astype(np.int64) - want).max() <= tolerance, (got.tolist(), np.asarray(want).tolist())


def test_sixteen_bit_gray_is_scaled_not_clipped():
    data = MODES["I;16-png"][0]
    clipped = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))  # what a plain convert gives
    assert clipped[0, 2, 0] == 255 and np.asarray(decode_image(data))[0, 2, 0] == 1  # 256 -> 1, not 255


@pytest.mark.parametrize(
    "image, fragment",
    [
        (encode(Image.fromarray(V16.astype(np.int32) * 30_000), "TIFF"), "signed or 32-bit integer gray pixels"),
        (encode(Image.fromarray(V16.astype(np.float32)), "TIFF"), "floating-point gray pixels"),
        (b"GIF89a but not really", "not an image"),
        (
            encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)))[:2000],
            "truncated",
        ),  # cut inside its pixel data
    ],
    ids=["I-32bit", "F-float", "not-an-image", "truncated"],
)
def test_images_without_a_usable_rgb_are_refused_with_one_line(image, fragment):
    with pytest.raises(ImageDecodeError) as err:
        decode_image(image)
    assert fragment in str(err.value) and "\n" not in str(err.value) and str(err.value)


# --------------------------------------------------------------------------- data readers (item 6)


def mode_folder(root: Path, names=None) -> ImageFolderDataset:
    """<root>/test/<class>/<mode>.<ext>: one image file per mode."""
    for i, name in enumerate(names or MODES):
        data = MODES[name][0]
        ext = "tif" if data[:2] in (b"II", b"MM") else "png"
        path = root / "test" / ("a" if i % 2 else "b") / f"{i:02d}-{name.replace(';', '')}.{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return ImageFolderDataset(root, splits=("test",))


def build(dataset: ImageFolderDataset, out: Path, per_shard: int = 4, dim: int = 8) -> Path:
    n = dataset.split_size("test")
    pairs = {"indices": np.zeros((n, 1), np.int64), "scores": np.ones((n, 1), np.float32)}
    write_split_shards(dataset, "test", pairs, np.ones((1, dim), np.float32), ["R0"], out, per_shard)
    write_manifest(dataset, out, per_shard, dim, {"model": "test"})
    return out


def test_shards_of_every_mode_load_as_the_conversion_gives(tmp_path):
    """Bytes are stored as they are; the loader's decode is the readers' decode: same pixels everywhere."""
    dataset = mode_folder(tmp_path / "images")
    out = build(dataset, tmp_path / "shards")
    assert validate_shards(out) == {"test": len(MODES)}
    batches = list(eval_loader(split_urls(out, "test"), 64))
    images = torch.cat([b["images"] for b in batches]).numpy()
    for i, sample in enumerate(iter_samples(split_urls(out, "test"))):
        item = dataset.sample("test", i)
        assert sample[item.ext] == item.data  # as stored, not re-encoded
        np.testing.assert_array_equal(images[i], np.asarray(decode_image(item.data)))


def test_shard_build_refuses_an_unusable_source_with_one_line(tmp_path, capsys):
    images = make_images(tmp_path / "images", {"train": 10, "val": 4, "test": 4})
    config = write_config(tmp_path, images, make_reports(tmp_path / "reports.jsonl"))
    pair_with_tiny_model(config)
    bad = images / "train" / "tumor" / "train_0005.png"
    bad.write_bytes(encode(Image.fromarray(np.ones((16, 16), np.float32)), "TIFF"))  # a float TIFF, named .png
    code = main(["shard", "build", "--config", str(config)])
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("clipit: error:")]
    assert code == 2 and len(errors) == 1
    assert errors[0].startswith(f"clipit: error: {bad}: cannot decode image (floating-point gray pixels")
    assert "replace or delete the file" in errors[0]
    shards = tmp_path / "run" / "shards"
    assert not (shards / "manifest.json").exists() and not (shards / "train" / "train-000001.tar").exists()


def test_pairing_converts_modes_and_refuses_like_the_build(tmp_path, monkeypatch, capsys):
    images = make_images(tmp_path / "images", {"train": 6, "val": 2, "test": 2})
    for i, name in enumerate(("RGBA", "I;16-png", "P-transparency", "LA")):  # non-RGB sources pair like RGB ones
        (images / "train" / ("benign", "tumor")[i % 2] / f"train_{i:04d}.png").write_bytes(MODES[name][0])
    config = write_config(tmp_path, images, make_reports(tmp_path / "reports.jsonl"))
    monkeypatch.setattr(clipit.pairing.encoders, "build_pairing_model", lambda *a, **k: tiny_model())
    assert main(["pair", "--config", str(config)]) == 0
    bad = images / "val" / "benign" / "val_0000.png"
    bad.write_bytes(MODES["L"][0][:30])
    capsys.readouterr()
    assert main(["pair", "--config", str(config), "--set", f"pairing.dir={tmp_path / 'again'}"]) == 2
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("clipit: error:")]
    assert len(errors) == 1 and errors[0].startswith(f"clipit: error: {bad}: cannot decode image")


# ------------------------------------------------------------------------------------ any size


def test_images_of_any_size_and_shape_come_out_at_the_model_size(tmp_path):
    """Small ones grow, big ones shrink, non-square ones are cut to their central square (as big tiles
    always were), never squeezed: the central square is blue, the rest red, so a squeezed image shows red."""
    root = tmp_path / "images"
    sizes = [(16, 16), (40, 24), (32, 32), (200, 120), (24, 80)]  # (width, height)
    for i, (w, h) in enumerate(sizes):
        image = np.zeros((h, w, 3), np.uint8)
        image[...] = (255, 0, 0)
        side = min(w, h)
        top, left = (h - side) // 2, (w - side) // 2
        image[top : top + side, left : left + side] = (0, 0, 255)
        path = root / "test" / "a" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
    out = build(ImageFolderDataset(root, splits=("test",)), tmp_path / "shards", per_shard=8)
    batch = next(iter(eval_loader(split_urls(out, "test"), 8, load_size=32)))  # mixed sizes share one batch
    assert tuple(batch["images"].shape) == (5, 32, 32, 3) and batch["images"].dtype == torch.uint8
    inner = batch["images"].numpy().astype(int)[:, 2:-2, 2:-2]  # the crop's edge may blend in a red neighbour
    assert (inner[..., 2] > 200).all() and (inner[..., 0] < 60).all()
    for w, h in sizes:
        assert load_image(encode(Image.new("RGB", (w, h))), 32).shape == (32, 32, 3)  # what predict uses


# ----------------------------------------------------------------------------- bad shards in the loader


@pytest.fixture()
def small_set(tmp_path):
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for i in range(8):
        path = root / "test" / "ab"[i % 2] / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(path)
    return build(ImageFolderDataset(root, splits=("test",)), tmp_path / "shards", per_shard=4)


def rewrite(path: Path, change) -> None:
    with tarfile.open(path) as tar:
        items = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    items = change(items)
    path.unlink()
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in items:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def loader_error(urls, kind: str, workers: int) -> str:
    loader = (
        eval_loader(urls, 2, num_workers=workers)
        if kind == "eval"
        else train_loader(urls, [4] * len(urls), 2, seed=0, num_workers=workers)
    )
    with pytest.raises(ShardError) as err:
        for _ in loader:
            pass
    text = str(err.value)
    assert "\n" not in text and "Traceback" not in text and "worker" not in text, text
    return text


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("kind", ["eval", "train"])
def test_corrupt_image_in_the_loader_names_shard_and_sample(small_set, kind, workers):
    url = split_urls(small_set, "test")[0]
    rewrite(
        Path(url),
        lambda items: [(n, b"\x89PNG\r\n\x1a\n garbage" if n == "test_00000002.png" else d) for n, d in items],
    )
    text = loader_error([url], kind, workers)
    assert text.startswith(f"{url}: sample test_00000002: its png image does not decode")
    assert "delete this shard and rerun `clipit shard build --config <config>`" in text


@pytest.mark.parametrize("workers", [0, 1])
def test_truncated_tar_in_the_loader_is_an_error_not_a_shorter_shard(small_set, workers):
    url = split_urls(small_set, "test")[1]
    with tarfile.open(url) as tar:
        cut = tar.getmembers()[8].offset  # between sample 1 and sample 2: plain tarfile just stops here
    Path(url).write_bytes(Path(url).read_bytes()[:cut])
    text = loader_error([url], "eval", workers)
    assert text.startswith(f"{url}: not a whole tar at sample test_00000005") and "truncated or corrupt" in text


def test_sample_without_its_embedding_in_the_loader(small_set):
    url = split_urls(small_set, "test")[0]
    rewrite(Path(url), lambda items: [(n, d) for n, d in items if n != "test_00000001.emb.npy"])
    assert loader_error([url], "eval", 0).startswith(f"{url}: sample test_00000001: no emb.npy")


# --------------------------------------------------------------------------------- clipit predict


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A unimodal model exported the way `clipit export` writes one (random tiny backbone)."""
    from clipit.config import ExperimentConfig, LoraConfig, ModelConfig, ShardsConfig, TrainConfig, dump_config
    from clipit.evaluation.export import export_run
    from clipit.models.backbones import build_backbone
    from clipit.models.checkpoint import save_model
    from clipit.models.factory import build_model

    mp = pytest.MonkeyPatch()
    mp.setenv("CLIPIT_OFFLINE", "1")
    mp.delenv("CLIPIT_WEIGHTS", raising=False)
    tmp = tmp_path_factory.mktemp("predict")
    backbone, _ = build_backbone("kaiko-vits16-tiny")
    torch.save(
        {"state_dict": {f"backbone._model.{k}": v for k, v in backbone.state_dict().items()}}, tmp / "vits16-tiny.ckpt"
    )
    (tmp / "weights.yaml").write_text("kaiko-vits16-tiny: vits16-tiny.ckpt\n")
    cfg = ExperimentConfig(
        output_dir=str(tmp),
        shards=ShardsConfig(dir=str(tmp / "shards")),
        model=ModelConfig(
            backbone="kaiko-vits16-tiny",
            weights_file=str(tmp / "weights.yaml"),
            text_dim=8,
            lora=LoraConfig(r=4, alpha=8, targets=["Linear"]),
        ),
    )
    cfg.methods = {"unimodal": TrainConfig(method="unimodal")}
    run = tmp / "runs" / "unimodal" / "seed-0"
    model, preprocess = build_model(cfg, cfg.methods["unimodal"], 2, 8)
    save_model(
        run / "best",
        model,
        {
            "method": "unimodal",
            "seed": 0,
            "classes": ["a", "b"],
            "text_dim": 8,
            "image_size": preprocess.size,
            "step": 1,
        },
        full=False,
    )
    dump_config(cfg, run / "config.yaml")
    (run / "train_summary.json").write_text(json.dumps({"steps": 1}))
    out = export_run(run, tmp / "export")
    mp.undo()
    return out


def predict(export_dir: Path, *images: Path):
    return cli("predict", str(export_dir), *map(str, images), "--json", env={**os.environ, "CLIPIT_OFFLINE": "1"})


def one_line(proc: subprocess.CompletedProcess, start: str) -> str:
    assert proc.returncode == 2, (proc.stdout[-2000:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr and "Warning" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"clipit: error: {start}"), proc.stderr[-3000:]
    return lines[0]


def test_predict_takes_every_mode_and_size(exported, tmp_path):
    files = []
    for name in ("I;16-png", "RGBA", "P", "CMYK-tiff", "RGB-16bit-tiff", "1-bit"):
        path = tmp_path / f"{name.replace(';', '')}.{'tif' if 'tiff' in name else 'png'}"
        path.write_bytes(MODES[name][0])  # 2 x 3 pixels: far below the model's input size
        files.append(path)
    big = tmp_path / "big.png"
    Image.new("RGB", (300, 170), (200, 100, 50)).save(big)
    proc = predict(exported, *files, big)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout)
    assert [r["image"] for r in rows] == list(map(str, files + [big]))
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-5 for r in rows)


@pytest.mark.parametrize("side", [10_000, 20_000])  # PIL warns above MAX_IMAGE_PIXELS, raises above twice that
def test_predict_refuses_a_decompression_bomb_with_one_line(exported, tmp_path, side):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(side, side))
    one_line(predict(exported, bomb), f"{bomb}: not a usable image (too many pixels for PIL")


@pytest.mark.parametrize("content", [b"id,label\n1,tumor\n", b""], ids=["csv", "empty"])
def test_predict_refuses_a_file_that_is_no_image(exported, tmp_path, content):
    path = tmp_path / "notes.png"
    path.write_bytes(content)
    one_line(predict(exported, path), f"{path}: not a usable image (not an image")


def test_predict_refuses_a_folder_without_images(exported, tmp_path):  # a folder is an input (docs/predict.md)
    one_line(predict(exported, tmp_path), f"{tmp_path}: a folder with no image or slide files")
