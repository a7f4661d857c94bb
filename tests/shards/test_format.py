import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from clipit.data.folder import ImageFolderDataset
from clipit.locks import LOCK_FILE
from clipit.shards.codec import decode_embedding
from clipit.shards.manifest import LOCKS, ShardError, load_manifest, split_urls
from clipit.shards.reader import iter_samples
from clipit.shards.validate import validate_shards
from clipit.shards.writer import write_manifest, write_split_shards


@pytest.fixture()
def dataset(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in [("train", 7), ("val", 3)]:
        for i in range(n):
            cls = ["a", "b"][i % 2]
            path = tmp_path / "images" / split / cls / f"{split}_{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(path)
    return ImageFolderDataset(tmp_path / "images", splits=("train", "val"))


def build(dataset, out, per_shard=3):
    rng = np.random.default_rng(1)
    text = rng.normal(size=(5, 16)).astype(np.float32)
    ids = [f"R{i}" for i in range(5)]
    pairs = {}
    for split in dataset.splits:
        n = dataset.split_size(split)
        pairs[split] = {"indices": rng.integers(0, 5, (n, 2)), "scores": rng.random((n, 2)).astype(np.float32)}
        write_split_shards(dataset, split, pairs[split], text, ids, out, per_shard)
    write_manifest(dataset, out, per_shard, 16, {"model": "test"})
    return text, ids, pairs


def test_round_trip_is_identical(dataset, tmp_path):
    out = tmp_path / "shards"
    text, ids, pairs = build(dataset, out)
    manifest = load_manifest(out)
    assert manifest["splits"]["train"]["count"] == 7 and len(manifest["splits"]["train"]["shards"]) == 3
    assert manifest["splits"]["val"]["class_counts"] == {"0": 2, "1": 1}
    for split in dataset.splits:
        samples = list(iter_samples(split_urls(out, split)))
        assert len(samples) == dataset.split_size(split)
        for index, got in enumerate(samples):
            want = dataset.sample(split, index)
            meta = json.loads(got["json"])
            best = pairs[split]["indices"][index, 0]
            assert got["png"] == want.data  # bytes as stored, no re-encode
            assert int(got["cls"]) == want.label
            assert meta["source_key"] == want.key and meta["report_id"] == ids[best]
            assert meta["topk_report_indices"] == pairs[split]["indices"][index].tolist()
            emb = decode_embedding(got["emb.npy"])
            assert emb.dtype == np.float16
            np.testing.assert_array_equal(emb, text[best].astype(np.float16))
    assert validate_shards(out) == {"train": 7, "val": 3}


def test_rerun_skips_finished_shards_and_leaves_no_temp_files(dataset, tmp_path):
    out = tmp_path / "shards"
    build(dataset, out)
    first = {p: p.stat().st_mtime_ns for p in out.rglob("*.tar")}
    build(dataset, out)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.tar")} == first
    assert not [p for p in out.rglob("*") if p.name.startswith(".") and not is_lock(out, p)]


def test_validate_detects_corruption(dataset, tmp_path):
    out = tmp_path / "shards"
    build(dataset, out)
    shard = out / "train" / "train-000001.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    os.unlink(shard)
    with tarfile.open(shard, "w") as tar:  # drop one sample: a wrong count and a wrong checksum
        for member, data in members[:-5]:
            tar.addfile(member, io.BytesIO(data))
    with pytest.raises(ShardError, match="train-000001.tar"):
        validate_shards(out)


def test_manifest_refuses_an_unfinished_build(dataset, tmp_path):
    out = tmp_path / "shards"
    build(dataset, out)
    os.unlink(out / "val" / "val-000000.tar")
    with pytest.raises(ShardError, match="shard missing"):
        write_manifest(dataset, out, 3, 16, {})


def is_lock(shard_dir, path):
    """The writers' lock files (clipit.locks keeps them; they are not output)."""
    return path.name == LOCK_FILE or LOCKS in path.relative_to(shard_dir).parts
