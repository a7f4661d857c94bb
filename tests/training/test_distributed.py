"""Real multi-process training on CPU (gloo): torchrun DDP and DeepSpeed ZeRO-2 against one process.

Tolerance: DDP and ZeRO-2 at the same world size see the same data and must agree to float
precision. One process vs two differ by design (a global batch is cut from the epoch's order per rank), so their
test balanced accuracy must agree within 5 points on the tiny demo's converged linear probe.
"""

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from clipit_testing import ROOT, TORCHRUN_2, cli, train_args

pytestmark = pytest.mark.multiproc
PROBE = ["methods.unimodal.epochs=10"]


def torchrun(out, shards, *extra):
    cmd = [
        *TORCHRUN_2,
        *train_args(
            out,
            shards,
            *PROBE,
            "methods.unimodal.batch_size=32",
            "methods.unimodal.log_every=10",
            *extra,
            method="unimodal",
        ),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert_rank_zero_logs(proc.stdout, out / "runs" / "unimodal" / "seed-0" / "train.log")
    return load(out)


def assert_rank_zero_logs(stdout: str, train_log: Path):
    """Both ranks share the job's stdout: every progress line appears once, as in train.log (rank 0)."""
    lines = [line for line in stdout.splitlines() if re.match(r"^\d{4}-\d\d-\d\d .* unimodal seed 0: ", line)]
    assert lines == train_log.read_text().splitlines()
    steps = [m.group(1) for line in lines if (m := re.search(r": step (\d+/\d+) ", line))]
    assert steps == [f"{s}/40" for s in range(10, 41, 10)]  # 10 epochs x 4 steps, a line every 10, once each
    assert sum(": validation at step " in line for line in lines) == 10


def load(out: Path):
    run = out / "runs" / "unimodal" / "seed-0"
    with np.load(run / "predictions-test.npz") as pred:
        return (
            json.loads((run / "metrics.json").read_text()),
            json.loads((run / "train_summary.json").read_text()),
            pred["logits"],
        )


@pytest.mark.slow
def test_ddp_and_zero2_match_one_process(tiny_shards, tmp_path):
    proc = cli(*train_args(tmp_path / "one", tiny_shards, *PROBE, method="unimodal"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, one_summary, _ = load(tmp_path / "one")
    ddp, ddp_summary, ddp_logits = torchrun(tmp_path / "ddp", tiny_shards)
    zero2, zero2_summary, zero2_logits = torchrun(tmp_path / "zero2", tiny_shards, "methods.unimodal.distributed=zero2")
    assert one_summary["world_size"] == 1 and ddp_summary["world_size"] == zero2_summary["world_size"] == 2
    assert ddp_summary["steps"] == zero2_summary["steps"] == one_summary["steps"]  # same global batch, same steps
    assert zero2["balanced_accuracy"] == ddp["balanced_accuracy"]
    np.testing.assert_allclose(zero2_logits, ddp_logits, atol=1e-4)
    assert abs(ddp["balanced_accuracy"] - one["balanced_accuracy"]) <= 0.05
    assert ddp["n"] == one["n"] == 128  # every test sample evaluated exactly once across ranks


@pytest.mark.slow
def test_text_tower_is_one_engine_under_ddp_and_zero2(tiny_shards, tmp_path):
    """CLIP-IT with the text tower + LoRA and word drop on 2 ranks: DDP finds no unused parameter and
    ZeRO-2 partitions both sides in one engine; the two agree as for the vision-only model. The val
    split has one shard, so rank 1 validates nothing: evaluation must not enter DDP's forward (its
    buffer broadcast would wait for rank 1 forever)."""
    shard_dir = next(s.split("=", 1)[1] for s in tiny_shards if s.startswith("shards.dir="))
    assert len(json.loads((Path(shard_dir) / "manifest.json").read_text())["splits"]["val"]["shards"]) == 1
    tower = [
        "methods.clipit.warm_start=null",
        "methods.clipit.text_encoder=tower",
        "methods.clipit.word_drop=0.3",
        "methods.clipit.batch_size=32",
    ]
    results = {}
    for name, extra in (("ddp", []), ("zero2", ["methods.clipit.distributed=zero2"])):
        out = tmp_path / name
        cmd = [
            *TORCHRUN_2,
            *train_args(out, tiny_shards, *tower, *extra),
        ]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        run = out / "runs" / "clipit" / "seed-0"
        with np.load(run / "predictions-test.npz") as pred:
            results[name] = json.loads((run / "metrics.json").read_text()), pred["logits"]
    assert results["ddp"][0]["n"] == results["zero2"][0]["n"] == 128
    assert results["zero2"][0]["balanced_accuracy"] == results["ddp"][0]["balanced_accuracy"]
    np.testing.assert_allclose(results["zero2"][1], results["ddp"][1], atol=1e-4)
