"""A real TensorBoard server over a tiny demo grid (one method, two seeds) serves what a comparison
needs: runs named `<method>/seed-<n>` (no `tb` component), the train/val/test scalars, and one
HParams session per run whose metric values are the run's final val and test metrics."""

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from clipit_testing import cli, wait_for

TENSORBOARD = Path(sys.executable).parent / "tensorboard"
RUNS = ["unimodal/seed-0", "unimodal/seed-1"]
HPARAMS = {
    "method",
    "backbone",
    "dataset",
    "seed",
    "lam",
    "lr",
    "batch_size",
    "finetune",
    "text_encoder",
    "lora.enabled",
    "lora.r",
    "lora.alpha",
    "lora.targets",
}


@pytest.fixture(scope="module")
def trained(tiny_shards, tmp_path_factory):
    """Both seeds of the tiny demo's unimodal probe, 2 steps each, trained and evaluated."""
    out = tmp_path_factory.mktemp("tb-grid")
    sets = [f"output_dir={out}", *tiny_shards, "methods.unimodal.epochs=0.5"]
    proc = cli(
        "train", "--config", "configs/demo-tiny.yaml", "--method", "unimodal", *[a for s in sets for a in ("--set", s)]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(url: str, body: dict | None = None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def server(trained, tmp_path_factory):
    """`tensorboard --logdir <output_dir>/tb` on a free loopback port; its URL once it serves both runs."""
    port = free_port()
    log = tmp_path_factory.mktemp("tb-server") / "tensorboard.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(TENSORBOARD), "--logdir", str(trained / "tb"), "--host", "127.0.0.1", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # its own group: the data server it starts ends with it
    url = f"http://127.0.0.1:{port}"

    def serving():
        if proc.poll() is not None:
            raise AssertionError(f"tensorboard exited {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            tags = get(f"{url}/data/plugin/scalars/tags")
        except (urllib.error.URLError, ConnectionError, OSError):
            return None
        return all("test/balanced_accuracy" in tags.get(run, {}) for run in RUNS)

    try:
        wait_for(serving, timeout=180, what="tensorboard to serve both runs")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def metrics(trained, run: str) -> dict:
    method, seed = run.split("/")
    return json.loads((trained / "runs" / method / seed / "metrics.json").read_text())


def test_runs_are_named_method_and_seed_and_serve_train_val_test_scalars(server, trained):
    tags = get(f"{server}/data/plugin/scalars/tags")
    assert sorted(tags) == RUNS  # `<method>/seed-<n>`: no trailing `tb`, no extra hparams sub-run
    for run in RUNS:
        assert {
            "train/loss",
            "train/lr",
            "val/loss",
            "val/balanced_accuracy",
            "test/balanced_accuracy",
            "test/accuracy",
            "test/loss",
        } <= set(tags[run])
        points = get(f"{server}/data/plugin/scalars/scalars?run={run}&tag=test/balanced_accuracy")
        assert len(points) == 1
        _, step, value = points[0]
        assert step == 2  # at the run's final training step
        assert value == pytest.approx(metrics(trained, run)["balanced_accuracy"], abs=1e-6)
        assert [p[1] for p in get(f"{server}/data/plugin/scalars/scalars?run={run}&tag=train/loss")] == [2]


def test_hparams_rank_the_runs_by_their_test_metrics(server, trained):
    experiment = get(f"{server}/data/plugin/hparams/experiment", {"experimentName": ""})
    assert HPARAMS <= {h["name"] for h in experiment["hparamInfos"]}
    assert {"test/balanced_accuracy", "test/loss", "val/balanced_accuracy", "val/loss"} <= {
        m["name"]["tag"] for m in experiment["metricInfos"]
    }
    groups = get(
        f"{server}/data/plugin/hparams/session_groups",
        {
            "experimentName": "",
            "startIndex": 0,
            "sliceSize": 10,
            "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"],
            "colParams": [{"metric": {"tag": "test/balanced_accuracy"}, "order": "ORDER_DESC"}],
        },
    )["sessionGroups"]
    assert sorted(g["name"] for g in groups) == RUNS  # one session per run, named like the run
    accs = []
    for group in groups:
        run = group["name"]
        hp = group["hparams"]
        assert (hp["method"], hp["seed"], hp["backbone"], hp["dataset"]) == (
            "unimodal",
            int(run[-1]),
            "demo-vit-tiny",
            "demo",
        )
        assert (hp["finetune"], hp["text_encoder"], hp["lora.r"], hp["lora.targets"]) == (
            "frozen",
            "cached",
            8,
            "Linear,Conv2d",
        )
        assert [s["status"] for s in group["sessions"]] == ["STATUS_SUCCESS"]  # evaluated
        values = {m["name"]["tag"]: m["value"] for m in group["metricValues"]}
        want = metrics(trained, run)
        assert values["test/balanced_accuracy"] == pytest.approx(want["balanced_accuracy"], abs=1e-6)
        assert values["test/loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert "val/balanced_accuracy" in values and "val/loss" in values
        accs.append(values["test/balanced_accuracy"])
    assert accs == sorted(accs, reverse=True)  # the view ranks the cells by the chosen metric
