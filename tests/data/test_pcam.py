"""PCAM reader on tiny HDF5 files with the official names, dataset names, shapes and dtypes."""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import re

import h5py
import numpy as np
import pytest

from clipit.data.base import DatasetError, decode_image
from clipit.data.pcam import PCAM_SIZES, PCamDataset

SIZES = {"train": 12, "val": 6, "test": 6}
FILE_SPLIT = {"train": "train", "val": "valid", "test": "test"}


def write_pcam(root, sizes=SIZES, compression=None):
    """Official layout: camelyonpatch_level_2_split_<s>_x.h5 ('x', N x 96 x 96 x 3 uint8) and _y.h5 ('y', N x 1 x 1 x 1 uint8)."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in sizes.items():
        x = rng.integers(0, 256, (n, 96, 96, 3), dtype=np.uint8)
        y = (np.arange(n) % 2).astype(np.uint8).reshape(n, 1, 1, 1)
        stem = f"camelyonpatch_level_2_split_{FILE_SPLIT[split]}"
        with h5py.File(root / f"{stem}_x.h5", "w") as f:
            f.create_dataset("x", data=x, chunks=(1, 96, 96, 3), compression=compression)
        with h5py.File(root / f"{stem}_y.h5", "w") as f:
            f.create_dataset("y", data=y)
        arrays[split] = (x, y.reshape(-1))
    return arrays


@pytest.fixture()
def pcam(tmp_path):
    return tmp_path, write_pcam(tmp_path)


def test_samples_decode_to_the_stored_pixels(pcam):
    root, arrays = pcam
    ds = PCamDataset(root, expected_sizes=SIZES)
    assert ds.classes == ("normal", "tumor")
    for split, (x, y) in arrays.items():
        assert ds.split_size(split) == len(x)
        np.testing.assert_array_equal(ds.labels(split), y)
        for i in (0, len(x) - 1):
            s = ds.sample(split, i)
            assert s.ext == "png" and s.label == y[i] and s.label in (0, 1)
            np.testing.assert_array_equal(np.asarray(decode_image(s.data)), x[i])  # lossless


def test_keys_unique_and_stable(pcam):
    root, _ = pcam
    keys = [
        [s.key for split in SIZES for s in PCamDataset(root, expected_sizes=None).iter_split(split)] for _ in range(2)
    ]
    assert keys[0] == keys[1]
    assert len(set(keys[0])) == sum(SIZES.values())
    assert keys[0][0] == "train/000000"


def test_iter_split_blocks_match_sample(pcam):
    root, _ = pcam
    ds = PCamDataset(root, expected_sizes=None, block=5)
    blocked = list(ds.iter_split("train", 3, 11))
    assert [s.key for s in blocked] == [ds.sample("train", i).key for i in range(3, 11)]
    assert [s.data for s in blocked] == [ds.sample("train", i).data for i in range(3, 11)]
    with pytest.raises(IndexError):
        ds.sample("train", 12)


def test_size_mismatch_error_names_file_and_fix(pcam):
    root, _ = pcam
    assert PCAM_SIZES == {"train": 262_144, "val": 32_768, "test": 32_768}
    with pytest.raises(DatasetError) as err:
        PCamDataset(root)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(str(root / "camelyonpatch_level_2_split_train_x.h5"))
    assert (
        "PCAM split 'train' has 12 patches, expected 262,144; point data.root at the official files, or, for a subset or re-split, set data.expected_sizes"
        in msg
    )


def test_xy_length_mismatch(pcam):
    root, _ = pcam
    with h5py.File(root / "camelyonpatch_level_2_split_valid_y.h5", "w") as f:
        f.create_dataset("y", data=np.zeros((5, 1, 1, 1), np.uint8))
    with pytest.raises(
        DatasetError, match=r"split_valid_x\.h5: 6 patches but camelyonpatch_level_2_split_valid_y\.h5 has 5 labels"
    ):
        PCamDataset(root, expected_sizes=None)


def test_missing_class_is_an_error(pcam):
    root, _ = pcam
    with h5py.File(root / "camelyonpatch_level_2_split_test_y.h5", "w") as f:
        f.create_dataset("y", data=np.zeros((6, 1, 1, 1), np.uint8))
    with pytest.raises(DatasetError, match=r"PCAM split 'test' has label values \[0\], expected \[0, 1\]"):
        PCamDataset(root, expected_sizes=None)


def test_missing_and_gzipped_files(pcam):
    root, _ = pcam
    x = root / "camelyonpatch_level_2_split_test_x.h5"
    x.rename(root / "camelyonpatch_level_2_split_test_x.h5.gz")
    with pytest.raises(DatasetError, match=re.escape(f"{x}: file not found; gunzip {x.name}.gz first")):
        PCamDataset(root, expected_sizes=None)
    (root / f"{x.name}.gz").unlink()
    with pytest.raises(DatasetError, match="file not found; PCAM needs the six official"):
        PCamDataset(root, expected_sizes=None)
    with pytest.raises(DatasetError, match="PCAM folder not found"):
        PCamDataset(root / "nope")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong_dataset"])
def test_unreadable_h5_names_the_file(pcam, damage):
    root, _ = pcam
    path = root / "camelyonpatch_level_2_split_train_x.h5"
    if damage == "garbage":
        path.write_bytes(b"this is not an hdf5 file" * 100)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:2000])
    else:
        with h5py.File(path, "w") as f:
            f.create_dataset("images", data=np.zeros((12, 96, 96, 3), np.uint8))
    with pytest.raises(DatasetError) as err:
        PCamDataset(root, expected_sizes=None)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def test_corrupt_chunk_fails_at_read_with_the_file_name(tmp_path):
    write_pcam(tmp_path, compression="gzip")
    path = tmp_path / "camelyonpatch_level_2_split_train_x.h5"
    with h5py.File(path, "r") as f:
        info = f["x"].id.get_chunk_info(7)  # chunk of patch 7
    raw = bytearray(path.read_bytes())
    raw[info.byte_offset : info.byte_offset + info.size] = bytes(info.size)
    path.write_bytes(bytes(raw))
    ds = PCamDataset(tmp_path, expected_sizes=None)  # metadata and labels are intact
    ds.sample("train", 6)
    with pytest.raises(DatasetError, match=re.escape(f"{path}: cannot read patches 7..7")):
        ds.sample("train", 7)


_INHERITED = {}  # set before the pool forks, so children get the parent's object (and its open handle) by fork


def _read_inherited(index):
    ds = _INHERITED["ds"]
    inherited = ds._pid == _INHERITED["parent"] and bool(ds._handles)
    s = ds.sample("train", index)
    return s.key, s.data, inherited, ds._pid == os.getpid()


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="needs fork")
def test_forked_workers_reopen_their_own_handles(pcam):
    root, _ = pcam
    ds = PCamDataset(root, expected_sizes=None)
    expected = [(ds.sample("train", i).key, ds.sample("train", i).data) for i in range(12)]  # parent now holds a handle
    _INHERITED.update(ds=ds, parent=os.getpid())
    try:
        with mp.get_context("fork").Pool(2) as pool:
            got = pool.map(_read_inherited, range(12))
    finally:
        _INHERITED.clear()
    assert [(k, d) for k, d, _, _ in got] == expected
    assert any(inherited for _, _, inherited, _ in got)  # some child started from the parent's handle...
    assert all(own for _, _, _, own in got)  # ...and every read went through the child's own
    clone = pickle.loads(pickle.dumps(ds))  # what spawned workers get: no handles
    assert clone._handles == {} and clone.sample("train", 3).data == expected[3][1]
    ds.close()
    assert ds.sample("train", 0).data == expected[0][1]  # reopens after close
