"""Image codecs of a shard set (clipit/shards/codec.py): png and raw give the same pixels through the
loader, auto picks raw for one-size datasets, the manifest records the codec, old png sets still read."""

import json

import numpy as np
import pytest
from PIL import Image

from clipit.data.folder import ImageFolderDataset
from clipit.shards.codec import PNG, RAW_FIELD, resolve_image
from clipit.shards.manifest import MANIFEST, ShardError, load_manifest, split_urls
from clipit.shards.reader import iter_samples
from clipit.shards.validate import validate_shards
from clipit.shards.writer import write_manifest, write_split_shards
from clipit.training.loader import eval_loader

CLASSES = ("a", "b")


def make_dataset(root, sizes=(16,), n=6):
    """RGB and palette/gray PNGs (every mode converts to RGB the same way for both codecs)."""
    rng = np.random.default_rng(0)
    for i in range(n):
        side = sizes[i % len(sizes)]
        img = Image.fromarray(rng.integers(0, 255, (side, side + 2, 3), dtype=np.uint8))
        img = img.convert("L") if i % 3 == 2 else img
        path = root / "train" / CLASSES[i % 2] / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path)
    return ImageFolderDataset(root, splits=("train",), classes=CLASSES)


def build(dataset, out, image):
    rng = np.random.default_rng(1)
    n = dataset.split_size("train")
    pairs = {"indices": rng.integers(0, 4, (n, 2)), "scores": rng.random((n, 2)).astype(np.float32)}
    text = rng.normal(size=(4, 8)).astype(np.float32)
    write_split_shards(dataset, "train", pairs, text, [f"R{i}" for i in range(4)], out, 4, image=image)
    write_manifest(dataset, out, 4, 8, {"model": "test"}, extra={"image": image})
    return out


def batches(out, size=None):
    return list(eval_loader(split_urls(out, "train"), batch_size=4, load_size=size))


@pytest.mark.parametrize("size", [None, 12])
def test_png_and_raw_give_identical_pixels(tmp_path, size):
    dataset = make_dataset(tmp_path / "images")
    raw = resolve_image("raw", dataset)
    assert raw == {"codec": "raw", "shape": [16, 18, 3], "dtype": "uint8"}
    png_out, raw_out = build(dataset, tmp_path / "png", PNG), build(dataset, tmp_path / "raw", raw)
    for want, got in zip(batches(png_out, size), batches(raw_out, size), strict=True):
        assert got["images"].dtype == want["images"].dtype and got["images"].shape == want["images"].shape
        assert np.array_equal(got["images"].numpy(), want["images"].numpy())
        assert got["keys"] == want["keys"] and got["labels"].tolist() == want["labels"].tolist()
    sample = next(iter_samples(split_urls(raw_out, "train")))
    assert RAW_FIELD in sample and "png" not in sample and json.loads(sample["json"])["image_shape"] == [16, 18, 3]
    assert "png" in next(iter_samples(split_urls(png_out, "train")))
    assert load_manifest(raw_out)["image"] == raw and load_manifest(png_out)["image"] == PNG
    assert validate_shards(raw_out) == validate_shards(png_out) == {"train": 6}


def test_auto_is_raw_for_one_size_datasets_and_keeps_an_existing_codec(tmp_path):
    dataset = make_dataset(tmp_path / "images")
    assert resolve_image("auto", dataset) == PNG  # a folder may hold any sizes
    dataset.fixed_size = True  # what pcam, crc, bach and the demo declare
    assert resolve_image("auto", dataset)["codec"] == "raw"
    assert resolve_image("auto", dataset, existing="png") == PNG  # a set already in the folder keeps its codec
    assert resolve_image("png", dataset) == PNG


def test_raw_refuses_a_second_size(tmp_path):
    dataset = make_dataset(tmp_path / "images", sizes=(16, 20))
    with pytest.raises(
        ShardError,
        match=r"image train/b/1: is 20x22x3 but this raw set stores 16x18x3 images; "
        r"set shards.codec: png",
    ):
        build(dataset, tmp_path / "raw", resolve_image("raw", dataset))


def test_a_png_set_from_before_codecs_still_reads(tmp_path):
    out = build(make_dataset(tmp_path / "images"), tmp_path / "old", PNG)
    manifest = json.loads((out / MANIFEST).read_text())
    del manifest["image"]  # what manifests written before the codec setting hold
    (out / MANIFEST).write_text(json.dumps(manifest))
    assert validate_shards(out) == {"train": 6}
    assert sum(len(b["keys"]) for b in batches(out)) == 6
