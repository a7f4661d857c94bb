"""The frozen-backbone feature cache (clipit/training/features.py, probe.py) against the online probe.

Tolerance: the cached loop replays the online loader's exact batches (same samples, same order), so
the only difference is float rounding: the cache computes features in eval batches of 2 x batch_size,
the online loop in training batches. Stated tolerance: test balanced accuracy and best step equal, test
loss within 1e-4 absolute, test logits within 1e-4 absolute, on the tiny demo's probe after 10 epochs.
"""

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from clipit.config import load_config
from clipit.shards.manifest import load_manifest, split_counts, split_urls
from clipit.shards.reader import iter_samples
from clipit.training.features import uses_feature_cache
from clipit.training.loader import train_loader
from clipit.training.probe import train_order
from clipit_testing import ROOT, TINY, TORCHRUN_2, assert_refused, cli, shard_copy, train_args, with_shards

PROBE = ["methods.unimodal.epochs=10", "methods.unimodal.evals_per_epoch=2"]


def run_dir(out: Path, seed: int = 0) -> Path:
    return out / "runs" / "unimodal" / f"seed-{seed}"


def train(out: Path, shards, *extra, seed: int = 0) -> dict:
    proc = cli(*train_args(out, shards, *PROBE, *extra, method="unimodal", seed=seed))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = run_dir(out, seed)
    with np.load(run / "predictions-test.npz") as pred:
        logits = pred["logits"]
    return {
        "metrics": json.loads((run / "metrics.json").read_text()),
        "summary": json.loads((run / "train_summary.json").read_text()),
        "best": json.loads((run / "best.json").read_text()),
        "logits": logits,
    }


def weights_file(path: Path, seed: int) -> str:
    """A demo-vit-tiny backbone's random weights as a file: the same backbone for every seed."""
    from clipit.models.backbones import build_backbone

    torch.manual_seed(seed)
    backbone, _ = build_backbone("demo-vit-tiny", weights="random")
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(path))
    return str(path)


@pytest.fixture
def own_shards(tiny_shards, tmp_path):
    """The tiny overrides on a private shard copy: each test builds its caches there, none sees another's."""
    return with_shards(tiny_shards, shard_copy(tiny_shards, tmp_path))


def test_cached_probe_matches_the_online_probe(own_shards, tmp_path):
    online = train(tmp_path / "online", own_shards, "methods.unimodal.feature_cache=false")
    cached = train(tmp_path / "cached", own_shards)
    assert "feature_cache" not in online["summary"] and cached["summary"]["backbone_forwards"] == 256 + 64
    # online: every step's batch and every validation (10 epochs x 2) through the frozen backbone
    steps = online["summary"]["steps"]
    assert online["summary"]["backbone_forwards"] == steps * 256 // online["summary"]["batches_per_epoch"] + 20 * 64
    assert cached["summary"]["best_step"] == online["summary"]["best_step"]
    assert cached["metrics"]["balanced_accuracy"] == online["metrics"]["balanced_accuracy"]
    assert abs(cached["metrics"]["loss"] - online["metrics"]["loss"]) <= 1e-4
    np.testing.assert_allclose(cached["logits"], online["logits"], atol=1e-4)
    # the same checkpoint sidecar (the setting itself aside): warm starts and export cannot tell them apart
    for best in (online["best"], cached["best"]):
        best["train"].pop("feature_cache")
    assert cached["best"] == online["best"]


@pytest.mark.slow  # the default tier keeps its siblings; CI runs this tier too
def test_cache_is_shared_by_seeds_and_follows_the_weights(own_shards, tmp_path):
    first = weights_file(tmp_path / "a.safetensors", 0)
    runs = [train(tmp_path / "out", own_shards, f"model.weights={first}", seed=seed)["summary"] for seed in (0, 1)]
    assert runs[0]["backbone_forwards"] == 256 + 64  # one pass over train + val
    assert runs[1]["backbone_forwards"] == 0 and runs[1]["feature_cache"] == runs[0]["feature_cache"]
    other = weights_file(tmp_path / "b.safetensors", 1)  # other weights: another key, built anew
    changed = train(tmp_path / "out-b", own_shards, f"model.weights={other}")["summary"]
    assert changed["feature_cache"] != runs[0]["feature_cache"] and changed["backbone_forwards"] == 320


def test_a_damaged_cache_is_one_line_naming_the_file(own_shards, tmp_path):
    first = weights_file(tmp_path / "a.safetensors", 0)
    cache = Path(train(tmp_path / "out", own_shards, f"model.weights={first}")["summary"]["feature_cache"])
    part = cache / "train" / "train-000001.safetensors"
    data = bytearray(part.read_bytes())
    data[-5] ^= 0xFF
    part.write_bytes(bytes(data))
    proc = cli(*train_args(tmp_path / "out", own_shards, *PROBE, f"model.weights={first}", method="unimodal", seed=1))
    assert_refused(
        proc,
        run_dir(tmp_path / "out", 1),
        str(part),
        "sha256",
        f"delete {cache}",
        absent=["train_summary.json", "best.safetensors"],
    )


def test_train_order_replays_the_loader(tiny_shards):
    """The cached loop's batches are the shard loader's, worker streams and epochs included."""
    shard_dir = next(s.split("=", 1)[1] for s in tiny_shards if s.startswith("shards.dir="))
    manifest = load_manifest(shard_dir)
    urls = split_urls(shard_dir, "train", manifest)
    keys, rows, start = [], [], 0
    for url in urls:
        shard = [s["__key__"] for s in iter_samples([url])]
        keys += shard
        rows.append(range(start, start + len(shard)))
        start += len(shard)
    counts = split_counts(manifest, "train")
    # 256 samples in batches of 48: 5 per epoch, so the 2 workers' shares differ (3 and 2)
    for workers in (0, 2):
        loader = train_loader(urls, counts, 48, seed=3, num_workers=workers, load_size=8)
        next_epoch = train_order(urls, rows, 48, seed=3, num_workers=workers)
        for _ in range(2):
            expected = [batch["keys"] for batch in loader]
            assert len(expected) == 5
            assert [[keys[i] for i in b.tolist()] for b in next_epoch()] == expected


def test_which_methods_use_the_cache():
    cfg = load_config(ROOT / TINY)
    assert uses_feature_cache(cfg, "unimodal")
    assert not uses_feature_cache(cfg, "clipit")  # LoRA trains the backbone
    cfg.methods["clipit"].finetune = "frozen"  # the no-LoRA ablation: P, H_t, F on the cached features
    cfg.methods["clipit"].augment = False
    assert uses_feature_cache(cfg, "clipit")
    cfg.methods["clipit"].text_encoder = "tower"  # the tower encodes tokens every step: not a cached input
    assert not uses_feature_cache(cfg, "clipit")
    cfg.methods["unimodal"].augment = True
    assert not uses_feature_cache(cfg, "unimodal")
    cfg.methods["unimodal"].augment, cfg.methods["unimodal"].feature_cache = False, False
    assert not uses_feature_cache(cfg, "unimodal")


@pytest.mark.slow
@pytest.mark.multiproc
def test_two_ranks_build_one_cache_and_match_online(own_shards, tmp_path):
    """torchrun, 2 processes: the ranks encode disjoint shards, rank 0 writes the manifest, and the cached
    run reproduces the online 2-process run (same per-rank batches) within the stated tolerance."""
    results = {}
    for name, extra in (("online", ["methods.unimodal.feature_cache=false"]), ("cached", [])):
        out = tmp_path / name
        cmd = [
            *TORCHRUN_2,
            *train_args(out, own_shards, *PROBE, "methods.unimodal.batch_size=32", *extra, method="unimodal"),
        ]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        run = run_dir(out)
        with np.load(run / "predictions-test.npz") as pred:
            results[name] = (
                json.loads((run / "metrics.json").read_text()),
                json.loads((run / "train_summary.json").read_text()),
                pred["logits"],
            )
    (online, _, online_logits), (cached, summary, cached_logits) = results["online"], results["cached"]
    assert summary["world_size"] == 2 and "feature_cache" in summary
    assert cached["balanced_accuracy"] == online["balanced_accuracy"]
    np.testing.assert_allclose(cached_logits, online_logits, atol=1e-4)
