"""CRC reader on a tiny copy of the NCT-CRC-HE-100K / CRC-VAL-HE-7K folder layout (real .tif files)."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
from PIL import Image

import clipit.data.crc as crc
from clipit.data.base import DatasetError, decode_image
from clipit.data.crc import CRC_CLASSES, CRC_SIZES, CRCDataset, stratified_split

POOL_COUNTS = [7, 5, 9, 6, 5, 8, 5, 6, 9]  # 60 patches -> 12 val
TEST_PER_CLASS = 2
SIZES = {"train": 48, "val": 12, "test": 18}
# Class sizes of the real NCT-CRC-HE-100K.
REAL_COUNTS = [10_407, 10_566, 11_512, 11_557, 8_896, 13_536, 8_763, 10_446, 14_317]


def _tif(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path, format="TIFF")


def write_crc(root):
    rng = random.Random(0)
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    for label, (cls, n) in enumerate(zip(CRC_CLASSES, POOL_COUNTS)):
        for _ in range(n):  # real names look like ADI-AAAFLCLY.tif
            _tif(root / "NCT-CRC-HE-100K" / cls / f"{cls}-{''.join(rng.choices(letters, k=8))}.tif", 10 * label)
        for _ in range(TEST_PER_CLASS):
            _tif(root / "CRC-VAL-HE-7K" / cls / f"{cls}-TCGA-{''.join(rng.choices(letters, k=8))}.tif", 10 * label)
    # Debris that unzipping on a Mac or browsing on Windows leaves behind.
    (root / "NCT-CRC-HE-100K" / "ADI" / "._ADI-AAAAAAAA.tif").write_bytes(b"junk")
    (root / "NCT-CRC-HE-100K" / "ADI" / "Thumbs.db").write_bytes(b"junk")
    (root / "NCT-CRC-HE-100K" / "__MACOSX").mkdir()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("crc")
    write_crc(root)
    return root


def test_splits_sizes_and_samples(root):
    ds = CRCDataset(root, expected_sizes=SIZES)
    assert [ds.split_size(s) for s in ds.splits] == [48, 12, 18]
    for split in ds.splits:
        labels = ds.labels(split)
        assert set(labels.tolist()) == set(range(9))
        for i in range(ds.split_size(split)):
            s = ds.sample(split, i)
            assert s.ext == "tif" and s.label == labels[i]
            assert s.data == (root / f"{s.key}.tif").read_bytes()  # bytes as stored
            img = decode_image(s.data)
            assert img.size == (8, 8) and img.getpixel((0, 0))[0] == 10 * s.label
            assert s.key.split("/")[1] == CRC_CLASSES[s.label]
    assert ds.sample("test", 0).key.startswith("CRC-VAL-HE-7K/ADI/ADI-TCGA-")


def test_keys_unique_and_split_partitions_the_pool(root):
    ds = CRCDataset(root, expected_sizes=None)
    keys = {s: [ds.sample(s, i).key for i in range(ds.split_size(s))] for s in ds.splits}
    assert sum(map(len, keys.values())) == len(set().union(*map(set, keys.values())))
    pool = sorted(
        p.relative_to(root).with_suffix("").as_posix() for p in (root / "NCT-CRC-HE-100K").glob("*/[A-Z]*.tif")
    )
    assert sorted(keys["train"] + keys["val"]) == pool
    assert all(k.startswith("NCT-CRC-HE-100K/") for k in keys["train"] + keys["val"])
    assert keys["train"] == sorted(keys["train"]) and keys["val"] == sorted(keys["val"])  # listing order kept


def test_split_is_deterministic_and_independent_of_listing_order(root, monkeypatch):
    reference = CRCDataset(root, expected_sizes=None)
    real_scandir = os.scandir

    class Shuffled:  # os.scandir, but yielding entries in a random order
        def __init__(self, path):
            self.it = real_scandir(path)

        def __enter__(self):
            entries = list(self.it)
            random.Random(1).shuffle(entries)
            return iter(entries)

        def __exit__(self, *exc):
            self.it.close()

    monkeypatch.setattr(crc.os, "scandir", Shuffled)
    shuffled = CRCDataset(root, expected_sizes=None)
    for split in reference.splits:
        assert [shuffled.sample(split, i).key for i in range(shuffled.split_size(split))] == [
            reference.sample(split, i).key for i in range(reference.split_size(split))
        ]
    monkeypatch.undo()
    other_seed = CRCDataset(root, expected_sizes=None, seed=7)
    assert [other_seed.sample("val", i).key for i in range(12)] != [reference.sample("val", i).key for i in range(12)]


def test_stratification_on_the_fixture(root):
    ds = CRCDataset(root, expected_sizes=None)
    val_counts = np.bincount(ds.labels("val"), minlength=9)
    # 20% of [7,5,9,6,5,8,5,6,9] = [1.4,1,1.8,1.2,1,1.6,1,1.2,1.8]: floors sum to 9, the 3 largest remainders get +1
    assert val_counts.tolist() == [1, 1, 2, 1, 1, 2, 1, 1, 2]
    np.testing.assert_array_equal(np.bincount(ds.labels("train"), minlength=9) + val_counts, POOL_COUNTS)


def test_stratified_split_at_full_scale_is_exactly_80_20():
    labels = np.repeat(np.arange(9), REAL_COUNTS)
    train, val = stratified_split(labels, 0.2, 42)
    assert (len(train), len(val)) == (CRC_SIZES["train"], CRC_SIZES["val"])
    assert np.intersect1d(train, val).size == 0 and np.all(np.diff(val) > 0)
    per_class = np.bincount(labels[val], minlength=9)
    assert np.all(np.abs(per_class - 0.2 * np.array(REAL_COUNTS)) < 1)
    again_train, again_val = stratified_split(labels, 0.2, 42)
    np.testing.assert_array_equal(val, again_val)


def test_default_sizes_mismatch_message(root):
    with pytest.raises(DatasetError) as err:
        CRCDataset(root)
    assert str(err.value) == (
        f"{root / 'NCT-CRC-HE-100K'}: CRC split 'train' has 48 patches, expected 80,000; "
        "point data.root at the official files, or, for a subset or re-split, set data.expected_sizes: "
        "{train: N, val: N, test: N} (data.expected_sizes: {} skips the size check)"
    )
    with pytest.raises(DatasetError, match="CRC split 'test' has 18 patches, expected 7,180"):
        CRCDataset(root, expected_sizes={"train": 48, "val": 12, "test": 7_180})
    CRCDataset(root, expected_sizes={"val": 12})  # a partial dict checks only the splits it names


def test_missing_folders(tmp_path):
    write_crc(tmp_path)
    with pytest.raises(DatasetError, match="CRC folder not found"):
        CRCDataset(tmp_path / "nope")
    for f in (tmp_path / "CRC-VAL-HE-7K" / "MUC").iterdir():
        f.unlink()
    with pytest.raises(DatasetError, match=r"CRC split 'test' has no images of class\(es\) \['MUC'\]"):
        CRCDataset(tmp_path, expected_sizes=None)
    (tmp_path / "CRC-VAL-HE-7K" / "MUC").rmdir()
    with pytest.raises(DatasetError, match=r"CRC-VAL-HE-7K/MUC: class folder missing"):
        CRCDataset(tmp_path, expected_sizes=None)
    (tmp_path / "NCT-CRC-HE-100K").rename(tmp_path / "NCT-CRC-HE-100K-NONORM")
    with pytest.raises(DatasetError, match=r"NCT-CRC-HE-100K: folder not found; unzip the official archive"):
        CRCDataset(tmp_path, expected_sizes=None)
