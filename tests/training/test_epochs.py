"""An epoch is a permutation: every training sample at most once per epoch across ranks and loader
workers (exactly once up to the remainder rule, training/epochs.py), and the coverage each run reports."""

import json
import subprocess
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from clipit.config import ConfigError
from clipit.data.folder import ImageFolderDataset
from clipit.shards.manifest import load_manifest, sample_index, split_counts, split_urls
from clipit.shards.order import plan_order, split_order
from clipit.shards.writer import write_manifest, write_split_shards
from clipit.training.epochs import batches_per_rank, slot_plan, worker_batches
from clipit.training.loader import train_loader
from clipit_testing import ROOT, TORCHRUN_2, cli, shard_copy, train_args, with_shards

CLASSES = ("a", "b", "c", "d")


def sorted_set(root, per_class=25, per_shard=16):
    """A class-sorted folder dataset (100 images: class a first, then b, ...) written as clipit writes it."""
    rng = np.random.default_rng(0)
    for label in CLASSES:
        for i in range(per_class):
            path = root / "images" / "train" / label / f"{i:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(path)
    dataset = ImageFolderDataset(root / "images", splits=("train",))
    n = dataset.split_size("train")
    pairs = {"indices": np.zeros((n, 1), np.int64), "scores": np.ones((n, 1), np.float32)}
    extra = {"order": plan_order({"train": n})}
    out = root / "shards"
    order = split_order(extra, "train")
    write_split_shards(dataset, "train", pairs, np.ones((1, 4), np.float32), ["R0"], out, per_shard, order=order)
    write_manifest(dataset, out, per_shard, 4, {"model": "test"}, extra=extra)
    return out, dataset


@pytest.mark.parametrize(
    "counts, batch, world, workers",
    [([16] * 6 + [4], 8, 1, 1), ([16] * 6 + [4], 8, 1, 3), ([1000] * 5 + [7], 64, 3, 4), ([5], 2, 2, 2)],
)
def test_each_epoch_splits_a_permutation_over_ranks_and_workers(counts, batch, world, workers):
    n = sum(counts)
    per_rank = batches_per_rank(n, batch, world)
    offsets = np.cumsum([0, *counts])
    epochs = []
    for epoch in (0, 1):
        drawn = []
        for rank in range(world):
            for worker in range(workers):
                plan = slot_plan(counts, batch, world, workers, 7, epoch, rank, worker)
                mine = [int(offsets[shard] + p) for shard, positions in plan for p in positions]
                assert len(mine) == worker_batches(per_rank, workers)[worker] * batch
                drawn += mine
        assert len(drawn) == len(set(drawn)) == per_rank * batch * world  # once each; the rest < one global batch
        assert n - len(drawn) < batch * world
        epochs.append(drawn)
    assert epochs[0] != epochs[1]  # a new order every epoch


def test_a_split_smaller_than_one_global_batch_is_refused():
    with pytest.raises(ConfigError, match=r"methods.unimodal.batch_size=4096 x 1 process\(es\).*<= 254"):
        batches_per_rank(254, 4096, 1, "methods.unimodal.batch_size")


@pytest.mark.parametrize("workers", [0, 2])
def test_an_epoch_of_a_class_sorted_set_draws_every_sample_once(tmp_path, workers):
    out, dataset = sorted_set(tmp_path)
    manifest = load_manifest(out)
    urls, counts = split_urls(out, "train", manifest), split_counts(manifest, "train")
    labels = dataset.labels("train")
    loader = train_loader(urls, counts, 8, seed=0, num_workers=workers)
    orders = []
    for _ in range(2):
        batches = list(loader)
        keys = [k for b in batches for k in b["keys"]]
        assert len(batches) == 100 // 8 and all(len(b["keys"]) == 8 for b in batches)
        assert len(set(keys)) == len(keys) == 96  # the remainder rule: 100 - 12 x 8 wait for a later epoch
        # shuffled at write time: a batch holds ~3.4 of 4 classes (a random batch: 3.6), not 1-2 as in dataset order
        assert np.mean([len({labels[sample_index(k)] for k in b["keys"]}) for b in batches]) > 3
        orders.append(keys)
    assert orders[0] != orders[1] and set(orders[0]) != set(orders[1])  # the skipped 4 change with the epoch
    # two ranks of one process each: disjoint halves of the same epoch
    ranks = [[k for b in train_loader(urls, counts, 8, seed=0, rank=r, world=2) for k in b["keys"]] for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 48 and not set(ranks[0]) & set(ranks[1])


def test_train_summary_and_log_report_each_epochs_coverage(resume_cell):
    """The session's 3-epoch cell (256 training samples, batches of 64, no loader worker)."""
    run = resume_cell / "runs" / "clipit" / "seed-0"
    coverage = json.loads((run / "train_summary.json").read_text())["coverage"]
    assert [c["epoch"] for c in coverage] == [1, 2, 3]
    for record in coverage:
        assert record["complete"] and record["batches_per_rank"] == 4
        assert record["split_size"] == record["unique_samples"] == record["samples_drawn"] == 256
        assert record["drawn_twice_or_more"] == record["not_drawn"] == 0
        assert record["classes"] == 4 and 3 < record["classes_per_batch"] <= 4
    lines = [ln for ln in (run / "train.log").read_text().splitlines() if " coverage: " in ln]
    assert (
        len(lines) == 3 and "epoch 1/3 coverage: 256/256 training samples seen (100.0%), none drawn twice" in lines[0]
    )


def test_one_epoch_with_two_loader_workers_sees_every_sample_once(tiny_shards, tmp_path):
    proc = cli(
        *train_args(
            tmp_path,
            tiny_shards,
            "methods.unimodal.epochs=1",
            "methods.unimodal.feature_cache=false",  # the shard loader itself, not the cached replay
            "methods.unimodal.num_workers=2",
            method="unimodal",
        )
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "unimodal" / "seed-0" / "train_summary.json").read_text())
    (record,) = summary["coverage"]
    assert record["unique_samples"] == record["samples_drawn"] == record["split_size"] == 256


def test_shards_in_dataset_order_are_refused_at_train_time(tiny_shards, tmp_path):
    shards = shard_copy(tiny_shards, tmp_path)
    manifest = json.loads((shards / "manifest.json").read_text())
    del manifest["order"]
    (shards / "manifest.json").write_text(json.dumps(manifest))
    proc = cli(
        *train_args(tmp_path / "out", with_shards(tiny_shards, shards), "methods.unimodal.epochs=1", method="unimodal")
    )
    assert proc.returncode == 2
    errors = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"{shards / 'manifest.json'}: the train split was written in dataset order" in errors[0]
    assert "rebuild the set: rerun `clipit shard build --config <config>` with `--overwrite`" in errors[0]


@pytest.mark.slow
@pytest.mark.multiproc
def test_two_processes_split_each_epoch_between_them(tiny_shards, tmp_path):
    """torchrun, 2 ranks x 2 loader workers: each epoch's 256 samples once across all four streams."""
    cmd = [
        *TORCHRUN_2,
        *train_args(
            tmp_path,
            tiny_shards,
            "methods.unimodal.epochs=2",
            "methods.unimodal.batch_size=32",
            "methods.unimodal.feature_cache=false",
            "methods.unimodal.num_workers=2",
            method="unimodal",
        ),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((tmp_path / "runs" / "unimodal" / "seed-0" / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and len(summary["coverage"]) == 2
    for record in summary["coverage"]:
        assert record["batches_per_rank"] == 4 and record["complete"]
        assert record["unique_samples"] == record["samples_drawn"] == 256 and record["drawn_twice_or_more"] == 0
    assert Counter(ln.count(" coverage: ") for ln in proc.stdout.splitlines())[1] == 2  # rank 0 logs, once
