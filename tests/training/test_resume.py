"""Killed runs resume to the same result as uninterrupted ones (deterministic on CPU)."""

import json
import signal
import subprocess

import numpy as np
import pytest

from clipit_testing import RESUME_CELL, cli, start_frozen_after, train_args, wait_stopped

CELL = RESUME_CELL  # 12 steps, a resume checkpoint every 2
# the trainable text tower with random word drop: LoRA on both sides, and token choices from the run's RNG
CELLS = {"cached": CELL, "tower": CELL + ["methods.clipit.text_encoder=tower", "methods.clipit.word_drop=0.3"]}


def run_dir(out):
    return out / "runs" / "clipit" / "seed-0"


def outputs(out):
    metrics = json.loads((run_dir(out) / "metrics.json").read_text())
    with np.load(run_dir(out) / "predictions-test.npz") as pred:
        return metrics, pred["logits"], pred["keys"]


@pytest.fixture(scope="module")
def uninterrupted(resume_cell, tiny_shards, tmp_path_factory):
    """Outputs of the uninterrupted run of a variant (each trained once; "cached" is the session's)."""
    done, dirs = {"cached": outputs(resume_cell)}, {"cached": resume_cell}

    def run(variant):
        if variant not in done:
            out = tmp_path_factory.mktemp(f"straight-{variant}")
            proc = cli(*train_args(out, tiny_shards, *CELLS[variant]))
            assert proc.returncode == 0, proc.stderr[-3000:]
            done[variant], dirs[variant] = outputs(out), out
        return done[variant]

    run.dirs = dirs
    return run


def interrupt_when_checkpointed(out, shards, sig, cell):
    """Train `cell` in a real process, frozen right after its first resume checkpoint (step 2), then send
    `sig`: the signal meets a run with steps left on any machine."""
    proc = start_frozen_after(
        "clipit.training.training_run:save_training_state",
        1,
        *train_args(out, shards, *cell),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_stopped(proc, 300, "its first checkpoint")
        proc.send_signal(sig)
        proc.send_signal(signal.SIGCONT)
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, stderr


@pytest.mark.parametrize(
    "variant, sig",
    [
        pytest.param("cached", signal.SIGKILL, id="sigkill"),
        pytest.param("cached", signal.SIGTERM, id="sigterm", marks=pytest.mark.slow),
        pytest.param("tower", signal.SIGKILL, id="tower-sigkill", marks=pytest.mark.slow),
    ],
)
def test_interrupted_run_resumes_to_identical_metrics(uninterrupted, tiny_shards, tmp_path, variant, sig):
    cell = CELLS[variant]
    code, stderr = interrupt_when_checkpointed(tmp_path, tiny_shards, sig, cell)
    assert code == -signal.SIGKILL if sig == signal.SIGKILL else code == 128 + signal.SIGTERM, stderr[-2000:]
    assert not (run_dir(tmp_path) / "metrics.json").exists()
    proc = cli(*train_args(tmp_path, tiny_shards, *cell))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir(tmp_path) / "train_summary.json").read_text())
    assert summary["resumed_from_step"] and summary["resumed_from_step"] >= 2
    # killed mid-epoch (4 steps each): the resumed epoch draws the rest of the same permutation, so every
    # epoch's samples and class mix are the uninterrupted run's, each sample once
    want_metrics, want_logits, want_keys = uninterrupted(variant)
    straight = json.loads((run_dir(uninterrupted.dirs[variant]) / "train_summary.json").read_text())
    assert summary["resumed_from_step"] % 4 and summary["coverage"] == straight["coverage"]
    assert all(c["unique_samples"] == c["samples_drawn"] == 256 for c in summary["coverage"])
    metrics, logits, keys = outputs(tmp_path)
    assert metrics["balanced_accuracy"] == want_metrics["balanced_accuracy"]
    assert (keys == want_keys).all()
    np.testing.assert_allclose(logits, want_logits, rtol=0, atol=1e-6)
