"""The whole slice on a tiny demo, as a user runs it: the real CLI in a real process (the session's demo,
conftest.py: tiny_demo, and a rerun), then checks of what it wrote."""

import json
import shutil
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from clipit_testing import ROOT, cli


def clipit(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "clipit", *args], cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def demo_run(tiny_demo):
    """`clipit demo` on the tiny config in a real process: the session's (conftest.py), shared."""
    return tiny_demo


def test_demo_prints_agreement_and_table(demo_run):
    out, stdout = demo_run
    assert "pairing class agreement" in stdout
    assert "| unimodal | 2 |" in stdout and "| clipit | 2 |" in stdout
    summary = json.loads((out / "results.json").read_text())
    assert 0 <= summary["agreement"]["all"] <= 1 and summary["agreement"]["chance"] == pytest.approx(0.25, abs=0.05)
    assert (out / "results.md").read_text().startswith("| method |")


def test_metrics_and_predictions_per_run(demo_run):
    out, _ = demo_run
    for method in ("unimodal", "clipit"):
        for seed in (0, 1):
            run = out / "runs" / method / f"seed-{seed}"
            metrics = json.loads((run / "metrics.json").read_text())
            assert metrics["n"] == 128 and 0 <= metrics["balanced_accuracy"] <= 1
            assert set(metrics["per_class_recall"]) == {"lymphocytes", "normal_mucosa", "stroma", "tumor"}
            assert (run / "predictions-test.npz").exists() and (run / "best.safetensors").exists()


def test_tensorboard_event_files_are_readable(demo_run):
    out, _ = demo_run
    acc = EventAccumulator(str(out / "tb" / "clipit" / "seed-0"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/ce", "train/kd", "train/lr", "val/balanced_accuracy", "perf/images_per_s"} <= tags
    assert len(acc.Scalars("val/loss")) == 2  # evals_per_epoch: 2


def test_shards_validate_and_rerun_resumes(demo_run, tmp_path):
    out = tmp_path / "demo"  # a copy: the session's demo is shared
    shutil.copytree(demo_run[0], out, symlinks=True)
    proc = cli("shard", "validate", str(out / "shards"))
    assert proc.returncode == 0 and proc.stdout.startswith("ok: ") and "train 256" in proc.stdout, proc.stderr
    before = (out / "runs" / "clipit" / "seed-0" / "metrics.json").stat().st_mtime_ns
    proc = clipit("demo", "--config", "configs/demo-tiny.yaml", "--set", f"output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "runs" / "clipit" / "seed-0" / "metrics.json").stat().st_mtime_ns == before


def test_bad_config_is_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {backbone: demo-vit-tiny, lora: {rank: 3}}\n")
    proc = cli("demo", "--config", str(bad))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "model.lora.rank" in proc.stderr and str(bad) in proc.stderr
