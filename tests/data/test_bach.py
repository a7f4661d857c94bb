"""BACH reader on 400 tiny TIFFs laid out like ICIAR2018_BACH_Challenge/Photos."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from clipit.data.bach import BACH_CLASSES, BACH_SIZES, BACHDataset, bach_split_indices
from clipit.data.base import DatasetError, decode_image

PREFIX = {"Benign": "b", "InSitu": "is", "Invasive": "iv", "Normal": "n"}


def write_bach(root):
    photos = root / "ICIAR2018_BACH_Challenge" / "Photos"
    for label, cls in enumerate(BACH_CLASSES):
        (photos / cls).mkdir(parents=True)
        for n in range(1, 101):  # pixel (R, G) = (label, number) identifies the file after decoding
            Image.fromarray(np.full((8, 8, 3), (label, n, 0), np.uint8)).save(
                photos / cls / f"{PREFIX[cls]}{n:03d}.tif", format="TIFF"
            )
    (photos / "microscopy_ground_truth.csv").write_text("b001.tif,Benign\n")  # shipped alongside the photos
    return photos


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return write_bach(tmp_path_factory.mktemp("bach"))


def _keys(ds, split):
    return [ds.sample(split, i).key for i in range(ds.split_size(split))]


def test_split_indices_reproduce_eva_and_the_reference_val():
    idx = bach_split_indices()
    assert {k: len(v) for k, v in idx.items()} == {"train": 254, "val": 14, "test": 132} == BACH_SIZES
    # eva's val (our test): ranges (41,59) (60,90) (139,169) (240,258) (260,273) (345,368)
    assert idx["test"] == [
        *range(41, 59),
        *range(60, 90),
        *range(139, 169),
        *range(240, 258),
        *range(260, 273),
        *range(345, 368),
    ]
    assert idx["val"] == [0, 20, 40, 108, 128, 178, 198, 218, 238, 289, 309, 329, 372, 392]
    eva_train = sorted(idx["train"] + idx["val"])
    assert len(eva_train) == 268 and eva_train[::20] == idx["val"]
    assert sorted(eva_train + idx["test"]) == list(range(400))


def test_samples_and_split_contents(photos):
    ds = BACHDataset(photos.parent.parent)  # default expected sizes hold for the full 400-photo layout
    assert ds.classes == ("Benign", "InSitu", "Invasive", "Normal")
    assert [ds.split_size(s) for s in ds.splits] == [254, 14, 132]
    counts = {s: np.bincount(ds.labels(s), minlength=4).tolist() for s in ds.splits}
    assert counts == {"train": [49, 66, 66, 73], "val": [3, 4, 3, 4], "test": [48, 30, 31, 23]}
    assert _keys(ds, "val") == [
        "Benign/b001",
        "Benign/b021",
        "Benign/b041",
        "InSitu/is009",
        "InSitu/is029",
        "InSitu/is079",
        "InSitu/is099",
        "Invasive/iv019",
        "Invasive/iv039",
        "Invasive/iv090",
        "Normal/n010",
        "Normal/n030",
        "Normal/n073",
        "Normal/n093",
    ]
    assert _keys(ds, "test")[:2] == ["Benign/b042", "Benign/b043"] and _keys(ds, "test")[-1] == "Normal/n068"
    all_keys = [k for s in ds.splits for k in _keys(ds, s)]
    assert len(set(all_keys)) == 400
    for split in ds.splits:
        for i in (0, ds.split_size(split) - 1):
            s = ds.sample(split, i)
            assert s.ext == "tif" and s.label == ds.labels(split)[i]
            assert s.data == (photos / f"{s.key}.tif").read_bytes()
            img = decode_image(s.data)
            r, g, _ = img.getpixel((0, 0))
            assert img.size == (8, 8) and r == s.label and f"{g:03d}" == s.key[-3:]


def test_root_may_name_any_level(photos):
    reference = _keys(BACHDataset(photos.parent.parent), "test")
    assert _keys(BACHDataset(photos.parent), "test") == reference
    assert _keys(BACHDataset(photos), "test") == reference


def test_size_mismatch_message(photos):
    with pytest.raises(DatasetError) as err:
        BACHDataset(photos.parent.parent, expected_sizes={"train": 268, "val": 0, "test": 132})
    assert str(err.value) == (
        f"{photos}: BACH split 'train' has 254 images, expected 268; "
        "point data.root at the official files, or, for a subset or re-split, set data.expected_sizes: "
        "{train: N, val: N, test: N} (data.expected_sizes: {} skips the size check)"
    )
    BACHDataset(photos.parent.parent, expected_sizes=None)


def test_incomplete_photos_are_rejected_even_without_size_checks(tmp_path):
    photos = write_bach(tmp_path)
    (photos / "InSitu" / "is050.tif").unlink()
    with pytest.raises(DatasetError, match="found Benign 100, InSitu 99, Invasive 100, Normal 100"):
        BACHDataset(tmp_path, expected_sizes=None)
    shutil.rmtree(photos / "Normal")
    with pytest.raises(DatasetError, match="BACH photos not found; set data.root"):
        BACHDataset(tmp_path, expected_sizes=None)
    with pytest.raises(DatasetError, match="BACH folder not found"):
        BACHDataset(tmp_path / "nope")
