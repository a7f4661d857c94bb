"""The train split is written in a seeded permutation, recorded in the plan and the manifest."""

import json
import shutil

import numpy as np
import pytest
from pairing.fakes import make_images, make_reports, pair_with_tiny_model, write_config

from clipit.cli import main
from clipit.data.folder import ImageFolderDataset
from clipit.io import sha256_file
from clipit.shards.manifest import PLAN, ShardError, load_manifest, sample_key, split_urls
from clipit.shards.order import ORDER_RNG, split_order
from clipit.shards.reader import iter_samples
from clipit.shards.validate import validate_shards


@pytest.fixture()
def built(tmp_path):
    images = make_images(tmp_path / "images", {"train": 21, "val": 6, "test": 9})
    config = write_config(tmp_path, images, make_reports(tmp_path / "reports.jsonl"))
    pair_with_tiny_model(config)
    assert main(["shard", "build", "--config", str(config)]) == 0
    return tmp_path / "run" / "shards", images, config


def test_manifest_records_the_permutation_the_shards_hold(built):
    shards, images, _ = built
    manifest = load_manifest(shards)
    record = manifest["order"]["train"]
    assert set(manifest["order"]) == {"train"}  # evaluation splits stay in dataset order
    assert (record["rng"], record["seed"], record["count"]) == (ORDER_RNG, 0, 21)
    order = split_order(manifest, "train")
    assert sorted(order.tolist()) == list(range(21)) and order.tolist() != list(range(21))
    keys = [s["__key__"] for s in iter_samples(split_urls(shards, "train"))]
    assert keys == [sample_key("train", int(i)) for i in order]
    dataset = ImageFolderDataset(images)
    for sample in iter_samples(split_urls(shards, "train")[:1]):  # a sample keeps its dataset identity
        index = int(sample["__key__"].rsplit("_", 1)[1])
        assert json.loads(sample["json"])["source_key"] == dataset.keys("train")[index]
        assert int(sample["cls"]) == dataset.labels("train")[index]
    assert [s["__key__"] for s in iter_samples(split_urls(shards, "val"))] == [sample_key("val", i) for i in range(6)]
    assert validate_shards(shards) == {"train": 21, "val": 6, "test": 9}


def test_validate_sees_shards_out_of_their_order(built):
    shards = built[0]
    first, second = split_urls(shards, "train")[:2]
    data = open(first, "rb").read()
    shutil.copyfile(second, first)
    open(second, "wb").write(data)
    manifest = load_manifest(shards)
    for shard in manifest["splits"]["train"]["shards"][:2]:  # re-hash, so only the order can tell
        shard["sha256"] = sha256_file(shards / shard["path"])
    (shards / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="key where this place of the set has"):
        validate_shards(shards)


def test_a_permutation_that_does_not_regenerate_is_refused(built):
    manifest = load_manifest(built[0])
    manifest["order"]["train"]["seed"] = 1
    with pytest.raises(ShardError, match="another permutation"):
        split_order(manifest, "train")


def test_a_set_in_dataset_order_is_refused_by_shard_build(built, capsys):
    shards, _, config = built
    for name in ("manifest.json", PLAN):
        plan = json.loads((shards / name).read_text())
        del plan["order"]
        (shards / name).write_text(json.dumps(plan))
    assert main(["shard", "build", "--config", str(config)]) == 2
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("clipit: error:")]
    assert len(errors) == 1 and "the train split written in dataset order then, shuffled now" in errors[0]
    assert "rerun `clipit shard build --config <config>` with `--overwrite`" in errors[0]
    assert main(["shard", "build", "--config", str(config), "--overwrite"]) == 0  # the advice rebuilds it
    assert "train" in load_manifest(shards)["order"]


def test_written_order_is_seeded_not_random():
    from clipit.shards.order import plan_order

    a, b = plan_order({"train": 1000, "val": 10}), plan_order({"train": 1000, "val": 10})
    assert a == b and set(a) == {"train"}
    assert np.array_equal(split_order({"order": a}, "train"), np.random.default_rng(0).permutation(1000))
