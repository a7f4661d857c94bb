"""End-to-end checks against the real one-node SLURM cluster from slurm/local-cluster.sh.

Start it first (``bash slurm/local-cluster.sh start``); these tests are skipped when
``sinfo`` is missing or ``local-cluster.sh status`` fails.  See docs/slurm.md.

Rules these tests follow (see the gotchas in docs/slurm.md):
- every submitit folder is a fresh ``tmp_path / "%j"``: job ids restart after a purge,
  and a reused folder silently returns an older run's result pickle;
- ``cluster="slurm"`` is always explicit (auto-detection picks slurm whenever ``srun``
  is on PATH);
- preemption is simulated with ``job._interrupt(timeout=True)`` (USR2 only), because
  the SIGTERM+USR2 pair is racy with proctrack/linuxproc.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clipit_testing import wait_for

submitit = pytest.importorskip("submitit")
cloudpickle = pytest.importorskip("cloudpickle")

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "slurm" / "local-cluster.sh"

# Jobs unpickle the functions below in a fresh interpreter where this test module is
# not importable (pytest put tests/slurm on sys.path only in this process): ship
# the module's functions and classes by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]

TEST_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def slurm_cluster() -> None:
    if shutil.which("sinfo") is None:
        pytest.skip("SLURM client tools not installed (run: bash slurm/local-cluster.sh start)")
    try:
        proc = subprocess.run(["bash", str(SCRIPT), "status"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:  # pragma: no cover - env dependent
        pytest.skip(f"local-cluster.sh status failed: {exc}")
    if proc.returncode != 0:
        pytest.skip(
            "local SLURM cluster not running (bash slurm/local-cluster.sh start): "
            + (proc.stderr or proc.stdout).strip()[-300:]
        )


def _executor(tmp_path: Path, **params):
    executor = submitit.AutoExecutor(folder=tmp_path / "%j", cluster="slurm")
    base = dict(slurm_partition="debug", timeout_min=5, cpus_per_task=1, mem_gb=1)
    base.update(params)
    executor.update_parameters(**base)
    return executor


# ----------------------------------------------------------------- job payloads
def _square_and_clock(x: int) -> dict:
    start = time.time()
    time.sleep(2.0)
    return {
        "value": x * x,
        "task": int(os.environ["SLURM_ARRAY_TASK_ID"]),
        "start": start,
        "end": time.time(),
    }


class _Counter(submitit.helpers.Checkpointable):
    """Counts to ``n``, persisting progress in ``self.i`` and in ``<workdir>/counter``.

    ``checkpoint`` (inherited) pickles ``self`` with its current state, so a requeued
    run resumes from ``self.i`` instead of 0.
    """

    def __init__(self) -> None:
        self.i = 0
        self.starts: list[tuple[int, int]] = []  # (i at start of run, SLURM_RESTART_COUNT)

    def __call__(self, workdir: str, n: int, step_s: float) -> dict:
        counter = Path(workdir) / "counter"
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        self.starts.append((self.i, restarts))
        while self.i < n:
            self.i += 1
            counter.write_text(str(self.i))
            time.sleep(step_s)
        return {"i": self.i, "starts": self.starts, "restart_count": restarts}


# ----------------------------------------------------------------------- tests
def test_sbatch_array_writes_all_outputs(tmp_path: Path) -> None:
    t0 = time.monotonic()
    out = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--partition=debug",
            "--array=0-3",
            f"--output={tmp_path}/task_%a.out",
            "--wrap",
            "echo task=$SLURM_ARRAY_TASK_ID",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    job_id = out.stdout.strip().split(";")[0]
    assert job_id.isdigit(), out.stdout

    def all_written():
        texts = {}
        for a in range(4):
            f = tmp_path / f"task_{a}.out"
            if not f.exists():
                return None
            texts[a] = f.read_text()
        return texts if all(t.strip() for t in texts.values()) else None

    texts = wait_for(all_written, 45, f"the 4 outputs of array job {job_id}")
    assert {a: t.strip() for a, t in texts.items()} == {a: f"task={a}" for a in range(4)}
    assert time.monotonic() - t0 < TEST_TIMEOUT_S


def test_submitit_map_array_honours_parallelism(tmp_path: Path) -> None:
    t0 = time.monotonic()
    executor = _executor(tmp_path, slurm_array_parallelism=2)
    items = [1, 2, 3, 4]
    jobs = executor.map_array(_square_and_clock, items)
    assert len(jobs) == 4
    # The throttle reached slurmctld (submitit submits `--array=0-3%2`) ...
    array_id = jobs[0].job_id.split("_")[0]
    show = subprocess.run(
        ["scontrol", "show", "job", array_id], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    assert "ArrayTaskThrottle=2" in show, show

    results = [job.result() for job in jobs]  # raises if any job failed
    assert [r["value"] for r in results] == [x * x for x in items]
    assert sorted(r["task"] for r in results) == [0, 1, 2, 3]
    # ... and was enforced: never more than 2 tasks ran at the same time.
    events = sorted([(r["start"], 1) for r in results] + [(r["end"], -1) for r in results])
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    assert peak <= 2, results
    assert time.monotonic() - t0 < TEST_TIMEOUT_S


@pytest.mark.slow
def test_checkpointable_job_is_requeued_and_resumes(tmp_path: Path) -> None:
    t0 = time.monotonic()
    executor = _executor(tmp_path)
    workdir = tmp_path / "work"
    workdir.mkdir()
    counter = workdir / "counter"
    n, step_s = 60, 0.1
    job = executor.submit(_Counter(), str(workdir), n, step_s)

    def progressed():
        try:
            return int(counter.read_text() or 0) >= 10
        except (FileNotFoundError, ValueError):
            return False

    wait_for(progressed, 30, f"job {job.job_id} to count to 10")
    # USR2 only: submitit's handler checkpoints (pickles self) and runs
    # `scontrol requeue`; AuthInfo=cred_expire=10 lets it restart within ~10-20 s.
    job._interrupt(timeout=True)
    interrupted_at = int(counter.read_text())

    result = job.result()
    assert result["i"] == n
    (first_i, first_rc), *later = result["starts"]
    assert (first_i, first_rc) == (0, 0)
    assert later, f"job was not requeued: {result}"
    resumed_i, resumed_rc = later[-1]
    # Resumed from the checkpointed state, not from scratch.
    assert 10 <= resumed_i < n, (result, interrupted_at)
    assert resumed_rc >= 1 and result["restart_count"] >= 1, result
    assert int(counter.read_text()) == n

    # sacct (slurmdbd) reports the final state: submitit relies on it for failures.
    # job.state only refreshes on submitit's back-off schedule; force a sacct call.
    wait_for(
        lambda: job.get_info(mode="force").get("State") == "COMPLETED",
        20,
        f"sacct to report job {job.job_id} COMPLETED",
        0.5,
    )
    assert time.monotonic() - t0 < TEST_TIMEOUT_S


def test_two_nodes_each_run_a_task_at_their_own_address() -> None:
    """`start --nodes 2`: one task per node, SLURM_NODEID follows the node list, and every node name
    resolves (the /etc/hosts lines the script writes) to the node's NodeAddr, not to 127.0.0.1."""
    show = subprocess.run(["scontrol", "-o", "show", "node"], capture_output=True, text=True, timeout=30).stdout
    addrs = dict(re.findall(r"NodeName=(\S+) .*?NodeAddr=(\S+)", show))
    if len(addrs) < 2:
        pytest.skip("one-node cluster (bash slurm/local-cluster.sh start --nodes 2 runs this test)")
    first, second = sorted(addrs)[:2]
    out = subprocess.run(
        [
            "srun",
            "--partition=debug",
            "--nodes=2",
            "--ntasks-per-node=1",
            f"--nodelist={first},{second}",
            "bash",
            "-c",
            'echo "$SLURMD_NODENAME $SLURM_NODEID $(getent ahostsv4 "$SLURMD_NODENAME" | head -n 1)"',
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    rows = sorted(line.split()[:3] for line in out.stdout.splitlines())
    assert rows == [[first, "0", addrs[first]], [second, "1", addrs[second]]], out.stdout
    assert "127.0.0.1" not in (addrs[first], addrs[second])
