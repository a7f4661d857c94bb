"""logging.trackers: a run logs to W&B (offline mode, a local folder) and MLflow (a local file store) through
accelerate's trackers, next to TensorBoard, with its hyperparameters and provenance; and it records
provenance.json. A tracker that cannot start is refused before training with one line."""

import json

import pytest

from clipit import layout
from clipit.provenance import read_provenance
from clipit_testing import cli

TRAIN = ["train", "--config", "configs/demo-tiny.yaml", "--method", "unimodal", "--seed", "0"]


def sets(*items):
    return [a for s in items for a in ("--set", s)]


@pytest.fixture
def local_stores(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps file stores behind this switch
    (tmp_path / "wandb").mkdir()
    return tmp_path


def test_wandb_and_mlflow_get_the_run_offline(tiny_shards, local_stores):
    out = local_stores / "out"
    trackers = "logging.trackers=[tensorboard, wandb, mlflow]"
    proc = cli(*TRAIN, *sets(f"output_dir={out}", *tiny_shards, "methods.unimodal.epochs=0.5", trackers))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = layout.run_dir(out, "unimodal", 0)

    record = read_provenance(run)
    assert record["run"]["method"] == "unimodal" and record["data"]["training_shards_sha256"]
    assert record["transform"]["input_size"] == 64 and record["precision"] == "fp32"
    summary = json.loads(layout.train_summary(run).read_text())
    assert record["data"]["training_shards_sha256"] == summary["training_shards"]

    [wandb_run] = (local_stores / "wandb" / "wandb").glob("offline-run-*")
    [records] = wandb_run.glob("run-*.wandb")  # what `wandb sync` uploads: the run, its config and history
    data = records.read_bytes()
    for needle in ("unimodal/seed-0", "demo-tiny", "provenance.config_sha256", record["config_sha256"], "train/loss"):
        assert needle.encode() in data, needle
    assert b"val/balanced_accuracy" in data

    [experiment] = [d for d in (local_stores / "mlruns").iterdir() if (d / "meta.yaml").exists() and d.name != "0"]
    assert "name: demo-tiny" in (experiment / "meta.yaml").read_text()
    [ml_run] = [d for d in experiment.iterdir() if d.is_dir() and (d / "metrics").is_dir()]
    assert (ml_run / "params" / "method").read_text() == "unimodal"
    assert (ml_run / "params" / "provenance.config_sha256").read_text() == record["config_sha256"]
    assert (ml_run / "tags" / "mlflow.runName").read_text() == "unimodal/seed-0"
    losses = (ml_run / "metrics" / "train" / "loss").read_text().split("\n")
    assert losses[0] and all(len(line.split()) == 3 for line in losses if line)  # timestamp value step
    assert (ml_run / "metrics" / "val" / "balanced_accuracy").exists()
    assert list(layout.tensorboard_dir(run).glob("events.out.tfevents.*"))  # TensorBoard as always


def test_mlflow_without_a_tracking_uri_is_one_line(tiny_shards, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "out"
    proc = cli(*TRAIN, *sets(f"output_dir={out}", *tiny_shards, "logging.trackers=[tensorboard, mlflow]"))
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "MLFLOW_TRACKING_URI is not set" in err[0], err
    assert not layout.run_dir(out, "unimodal", 0).exists()
