"""Two real SLURM nodes (`bash slurm/local-cluster.sh start --nodes 2`: node1 at 127.0.0.2, node2 at
127.0.0.3, one slurmd each): slurm/multinode.sbatch with torchrun and with accelerate launch (gloo on
CPU), and a submitit grid cell that spans both nodes.

Proved here: world size = nodes x processes (2 x 1 for the sbatch runs, 2 x 2 for the grid cell);
each node starts its processes with its own machine rank (node1 -> 0, node2 -> 1); the rendezvous
host is the job's first node and resolves to that node's address, not 127.0.0.1; two nodes x one
process give the one-node (1 x 2) run's result, with either launcher and also after a USR1 requeue
that both nodes resume from checkpoints/latest/ (test logits within atol 1e-5, balanced accuracy
within one test sample, loss within 1e-4). Skipped unless the cluster runs with >= 2 usable nodes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from clipit_testing import ROOT, TINY, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# CLIP-IT without warm start: 4 epochs are 8 steps at world size 2, a resume checkpoint every 2 steps.
CELL = ["methods.clipit.warm_start=null", "methods.clipit.epochs=4", "methods.clipit.checkpoint_every=2"]
LOGITS_ATOL = 1e-5


@pytest.fixture(scope="module")
def nodes() -> dict[str, str]:
    """{node name: NodeAddr} of a running cluster with >= 2 usable nodes, else skip."""
    if shutil.which("sinfo") is None:
        pytest.skip("SLURM client tools not installed (run: bash slurm/local-cluster.sh start --nodes 2)")
    proc = subprocess.run(
        ["bash", str(ROOT / "slurm/local-cluster.sh"), "status"], capture_output=True, text=True, timeout=60
    )
    show = subprocess.run(["scontrol", "-o", "show", "node"], capture_output=True, text=True, timeout=30).stdout
    found = dict(re.findall(r"NodeName=(\S+) .*?NodeAddr=(\S+)", show))
    if proc.returncode != 0 or len(found) < 2:
        pytest.skip(
            "needs the local cluster with 2 nodes (bash slurm/local-cluster.sh start --nodes 2): "
            + proc.stderr.strip()[-200:]
        )
    return found


def sbatch(out: Path, launcher: str, nodes: int, nproc: int, *sets: str) -> str:
    env = os.environ | {"LAUNCHER": launcher, "NPROC_PER_NODE": str(nproc), "OMP_NUM_THREADS": "1"}
    args = [a for s in [f"output_dir={out}", *sets] for a in ("--set", s)]
    proc = subprocess.run(
        [
            "sbatch",
            "--parsable",
            f"--nodes={nodes}",
            "--gpus-per-node=0",
            f"--cpus-per-task={nproc}",
            f"--output={out}.log",
            "slurm/multinode.sbatch",
            TINY,
            "clipit",
            "--",
            *args,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def run_dir(out: Path) -> Path:
    return out / "runs" / "clipit" / "seed-0"


def log(out: Path) -> str:
    path = Path(f"{out}.log")
    return path.read_text() if path.exists() else ""


def wait_file(job: str, out: Path, path: Path, timeout: float) -> None:
    """Wait for `path`; fail early (with the job's log) once the job has left the queue without it."""
    deadline, gone = time.monotonic() + timeout, 0
    while not path.exists():
        assert time.monotonic() < deadline, f"timed out waiting for {path}\n{log(out)[-3000:]}"
        queued = subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True, timeout=30).stdout
        gone = 0 if queued.strip() else gone + 1
        assert gone < 5 or path.exists(), f"job {job} ended without {path.name}\n{log(out)[-3000:]}"
        time.sleep(0.5)


def node_ranks(text: str) -> list[tuple[str, int]]:
    """(node, machine rank) of every node start that multinode.sbatch logged, in order."""
    return [(n, int(r)) for n, r in re.findall(r"^\[multinode\] node (\S+) machine rank (\d+):", text, re.M)]


@pytest.fixture(scope="module")
def jobs(nodes, tiny_shards, tmp_path_factory):
    """All sbatch runs at once (the cluster has room for them): the one-node reference (torchrun,
    1 x 2), torchrun on 2 nodes x 1, and accelerate on 2 nodes x 1, which gets USR1 (the time-limit
    signal) as soon as its first checkpoint exists."""
    folder = tmp_path_factory.mktemp("two-nodes")
    runs = {"one": ("torchrun", 1, 2), "torchrun": ("torchrun", 2, 1), "accelerate": ("accelerate", 2, 1)}
    submitted = {}
    try:
        for name, (launcher, n, nproc) in runs.items():
            submitted[name] = (sbatch(folder / name, launcher, n, nproc, *tiny_shards, *CELL), folder / name)
        job, out = submitted["accelerate"]
        wait_file(job, out, run_dir(out) / "checkpoints" / "latest" / "progress.json", 240)
        subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True, timeout=30)
        yield submitted
    finally:
        for job, _ in submitted.values():
            subprocess.run(["scancel", job], capture_output=True, timeout=30)


def outputs(out: Path):
    metrics = json.loads((run_dir(out) / "metrics.json").read_text())
    with np.load(run_dir(out) / "predictions-test.npz") as pred:
        return metrics, pred["logits"], pred["keys"]


def check_two_node_run(jobs, nodes, name: str) -> str:
    """`name` ran on both nodes with machine ranks 0 and 1, met at the first node's address, and gave
    the one-node run's result. Returns the job's log."""
    (job, out), (ref_job, ref) = jobs[name], jobs["one"]
    wait_file(job, out, run_dir(out) / "metrics.json", 240)
    wait_file(ref_job, ref, run_dir(ref) / "metrics.json", 120)
    first, second = sorted(nodes)[:2]
    text = log(out)
    assert "2 node(s) x 1 process(es)" in text and "1 node(s) x 2 process(es)" in log(ref), text[-3000:]
    assert set(node_ranks(text)) == {(first, 0), (second, 1)}, text[-3000:]
    host = re.search(rf"rendezvous (\S+):\d+, launcher {name}", text).group(1)
    assert host == first and socket.gethostbyname(host) == nodes[first] != "127.0.0.1", (host, nodes)
    summary = json.loads((run_dir(out) / "train_summary.json").read_text())
    assert summary["world_size"] == 2 * 1, summary
    metrics, logits, keys = outputs(out)
    want_metrics, want_logits, want_keys = outputs(ref)
    assert (keys == want_keys).all()
    np.testing.assert_allclose(logits, want_logits, rtol=0, atol=LOGITS_ATOL)
    assert metrics["balanced_accuracy"] == pytest.approx(want_metrics["balanced_accuracy"], abs=1 / len(keys))
    assert metrics["loss"] == pytest.approx(want_metrics["loss"], abs=1e-4)
    return text


def test_torchrun_on_two_nodes_gives_the_one_node_result(jobs, nodes):
    check_two_node_run(jobs, nodes, "torchrun")


def test_accelerate_on_two_nodes_resumes_on_both_nodes_after_usr1(jobs, nodes):
    text = check_two_node_run(jobs, nodes, "accelerate")
    summary = json.loads((run_dir(jobs["accelerate"][1]) / "train_summary.json").read_text())
    assert summary["resumed_from_step"] >= 2, summary
    assert "USR1: time limit near, requeueing" in text and "restart 1: 2 node(s) x 1 process(es)" in text, text[-3000:]
    before, after = text.split("restart 1:", 1)
    first, second = sorted(nodes)[:2]
    for part in (before, after):  # both nodes started their process again, with the same machine rank
        assert sorted(node_ranks(part)) == [(first, 0), (second, 1)], text[-3000:]


def test_grid_cell_spans_two_nodes(nodes, tiny_shards, tmp_path):
    """A submitit cell with nodes: 2 x tasks_per_node: 2 is one process group of 4 over both nodes."""
    profile = tmp_path / "two-nodes.yaml"
    profile.write_text(
        "executor: slurm\npartition: debug\nnodes: 2\ntasks_per_node: 2\ncpus_per_task: 1\n"
        "mem_gb: 2\ntimeout_min: 10\nsetup: [export OMP_NUM_THREADS=1]\n"
    )
    lines = [
        "name: two-nodes",
        f"base: {ROOT / TINY}",
        f"root: {tmp_path / 'runs'}",
        "profile: local-cluster",
        "seeds: [0]",
        "methods: [unimodal]",
        "set:",
        '  output_dir: "{root}/out"',
        *[f"  {item.split('=', 1)[0]}: {item.split('=', 1)[1]}" for item in tiny_shards],
        "  methods.unimodal.epochs: 1",
    ]
    grid = tmp_path / "grid.yaml"
    grid.write_text("\n".join(lines) + "\n")
    proc = subprocess.run(
        [sys.executable, "launchers/grid.py", "--config", str(grid), "--profile", str(profile), "--wait"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    cell = tmp_path / "runs" / "out" / "runs" / "unimodal" / "seed-0"
    assert json.loads((cell / "train_summary.json").read_text())["world_size"] == 2 * 2
    state = json.loads((cell / "state.json").read_text())
    assert state["state"] == "done", state

    def node_list():  # sacct has array tasks 4-5 s after they end (docs/slurm.md)
        out = subprocess.run(
            ["sacct", "-n", "-X", "-P", "-j", state["job_id"], "-o", "NodeList"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.split()
        return out[0] if out and out[0].startswith(first.rstrip("0123456789")) else None

    first, second = sorted(nodes)[:2]
    used = wait_for(node_list, 30, f"sacct to list the nodes of {state['job_id']}", 1.0)
    expanded = subprocess.run(
        ["scontrol", "show", "hostnames", used], capture_output=True, text=True, timeout=30
    ).stdout.split()
    assert expanded == [first, second], used
