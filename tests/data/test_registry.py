"""build_dataset: names -> readers, options passed through, clear errors for unknown names/options."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from PIL import Image

from clipit.data.bach import BACHDataset
from clipit.data.base import DatasetError
from clipit.data.crc import CRCDataset
from clipit.data.folder import ImageFolderDataset
from clipit.data.pcam import PCamDataset
from clipit.data.registry import DATASETS, build_dataset


def _tiny_pcam(root):
    for split in ("train", "valid", "test"):
        with h5py.File(root / f"camelyonpatch_level_2_split_{split}_x.h5", "w") as f:
            f.create_dataset("x", data=np.zeros((4, 96, 96, 3), np.uint8))
        with h5py.File(root / f"camelyonpatch_level_2_split_{split}_y.h5", "w") as f:
            f.create_dataset("y", data=np.array([0, 1, 0, 1], np.uint8).reshape(4, 1, 1, 1))


def _tiny_folder(root):
    for split in ("train", "val", "test"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            Image.new("RGB", (4, 4)).save(root / split / cls / "x.png")


def test_known_names():
    assert {k: DATASETS[k] for k in ("pcam", "crc", "bach", "folder")} == {
        "pcam": PCamDataset,
        "crc": CRCDataset,
        "bach": BACHDataset,
        "folder": ImageFolderDataset,
    }


def test_builds_readers_with_options(tmp_path):
    _tiny_pcam(tmp_path)
    ds = build_dataset("PCAM", tmp_path, expected_sizes=None)  # names are case-insensitive
    assert isinstance(ds, PCamDataset) and ds.split_size("val") == 4
    with pytest.raises(DatasetError, match="PCAM split 'train' has 4 patches, expected 262,144"):
        build_dataset("pcam", str(tmp_path))
    _tiny_folder(tmp_path / "f")
    ds = build_dataset("folder", tmp_path / "f")
    assert isinstance(ds, ImageFolderDataset) and ds.classes == ("a", "b")


def test_unknown_name_and_option(tmp_path):
    with pytest.raises(
        DatasetError,
        match=r"unknown dataset 'camelyon'; set data.name to one of \['bach', 'crc', 'demo', 'folder', 'pcam'",
    ):
        build_dataset("camelyon", tmp_path)
    with pytest.raises(
        DatasetError, match=r"dataset 'crc' does not take option\(s\) \['expected_size'\]; it takes \['expected_sizes'"
    ):
        build_dataset("crc", tmp_path, expected_size=None)


def test_reader_errors_pass_through(tmp_path):
    for name in ("pcam", "crc", "bach", "folder"):
        with pytest.raises(DatasetError, match=str(tmp_path / "missing")):
            build_dataset(name, tmp_path / "missing")


def test_registry_is_extensible(tmp_path, monkeypatch):
    monkeypatch.setitem(DATASETS, "demo", lambda root, **kw: ("demo", root, kw))
    assert build_dataset("demo", tmp_path, n=3) == ("demo", tmp_path, {"n": 3})
