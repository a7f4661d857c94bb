"""Killed runs resume to the same result as uninterrupted ones (deterministic on CPU)."""
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from clipit_testing import ROOT, run_clipit, train_args

# CLIP-IT without warm start so one cell stands alone; 12 steps, a resume checkpoint every 2.
CELL = ["methods.clipit.warm_start=null", "methods.clipit.epochs=3", "methods.clipit.checkpoint_every=2",
        "methods.clipit.evals_per_epoch=1"]


def run_dir(out):
    return out / "runs" / "clipit" / "seed-0"


def outputs(out):
    metrics = json.loads((run_dir(out) / "metrics.json").read_text())
    with np.load(run_dir(out) / "predictions-test.npz") as pred:
        return metrics, pred["logits"], pred["keys"]


@pytest.fixture(scope="module")
def uninterrupted(tiny_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    proc = run_clipit(*train_args(out, tiny_shards, *CELL))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return outputs(out)


def interrupt_when_checkpointed(out, shards, sig, min_step=2):
    proc = subprocess.Popen([sys.executable, "-m", "clipit.cli", *train_args(out, shards, *CELL)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    progress = run_dir(out) / "checkpoints" / "latest" / "progress.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if progress.exists() and json.loads(progress.read_text())["step"] >= min_step:
            proc.send_signal(sig)
            break
        time.sleep(0.02)
    _, stderr = proc.communicate(timeout=300)
    return proc.returncode, stderr


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_interrupted_run_resumes_to_identical_metrics(uninterrupted, tiny_shards, tmp_path, sig):
    code, stderr = interrupt_when_checkpointed(tmp_path, tiny_shards, sig)
    assert code == -signal.SIGKILL if sig == signal.SIGKILL else code == 128 + signal.SIGTERM, stderr[-2000:]
    assert not (run_dir(tmp_path) / "metrics.json").exists()
    proc = run_clipit(*train_args(tmp_path, tiny_shards, *CELL))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir(tmp_path) / "train_summary.json").read_text())
    assert summary["resumed_from_step"] and summary["resumed_from_step"] >= 2
    metrics, logits, keys = outputs(tmp_path)
    want_metrics, want_logits, want_keys = uninterrupted
    assert metrics["balanced_accuracy"] == want_metrics["balanced_accuracy"]
    assert (keys == want_keys).all()
    np.testing.assert_allclose(logits, want_logits, rtol=0, atol=1e-6)
