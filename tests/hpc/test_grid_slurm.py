"""Grids on the real local SLURM cluster (slurm/local-cluster.sh): array submission, requeue and
resume from the trainer's checkpoint, reruns that recompute nothing, multi-task (DDP) cells.

Skipped unless `sinfo` exists and `bash slurm/local-cluster.sh status` succeeds. Every submission
uses fresh folders under tmp_path (SLURM job ids repeat after a purge: stale result pickles).
The tiny shards come from the session fixture `tiny_shards` (tests/conftest.py, `clipit shard build`).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clipit.hpc.ledger import live_slurm_jobs
from clipit_testing import ROOT, wait_for

SCRIPT = ROOT / "slurm" / "local-cluster.sh"
pytestmark = [pytest.mark.slurm]


@pytest.fixture(scope="module")
def slurm_cluster() -> None:
    if shutil.which("sinfo") is None:
        pytest.skip("SLURM client tools not installed (run: bash slurm/local-cluster.sh start)")
    try:
        proc = subprocess.run(["bash", str(SCRIPT), "status"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:  # pragma: no cover - environment dependent
        pytest.skip(f"local-cluster.sh status failed: {exc}")
    if proc.returncode != 0:
        pytest.skip(
            "local SLURM cluster not running (bash slurm/local-cluster.sh start): "
            + (proc.stderr or proc.stdout).strip()[-300:]
        )


def write_grid(
    folder: Path, shards: list[str], seeds: list[int], sets: dict, methods: list[str], name: str = "slurm-test"
) -> Path:
    lines = [
        f"name: {name}",
        f"base: {ROOT / 'configs' / 'demo-tiny.yaml'}",
        f"root: {folder / 'runs'}",
        "profile: local-cluster",
        f"seeds: {seeds}",
        f"methods: {methods}",
        "set:",
        '  output_dir: "{root}/out"',
    ]
    lines += [f"  {item.split('=', 1)[0]}: {item.split('=', 1)[1]}" for item in shards]
    lines += [f"  {k}: {v}" for k, v in sets.items()]
    path = folder / "grid.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def launch(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "launchers/grid.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def job_lines(stdout: str) -> list[tuple[str, str]]:
    return re.findall(r"^job (\S+)\s+(.*?)(?:  \(after .*\))?$", stdout, re.M)


def run_dir(root: Path, method: str, seed: int) -> Path:
    return root / "runs" / "out" / "runs" / method / f"seed-{seed}"


def state(root: Path, method: str, seed: int) -> dict:
    try:
        return json.loads((run_dir(root, method, seed) / "state.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


SEEDS = [0, 1, 2, 3]
CELL_FILES = ("metrics.json", "train_summary.json", "best.safetensors", "predictions-test.npz")


@pytest.fixture(scope="module")
def grid_run(slurm_cluster, tiny_shards, tmp_path_factory):
    """4 seeds x (unimodal -> CLIP-IT): 4 array tasks of 2 cells; CLIP-IT checkpoints every 2 of 12 steps."""
    folder = tmp_path_factory.mktemp("slurm-grid")
    grid = write_grid(
        folder,
        tiny_shards,
        SEEDS,
        {"methods.unimodal.epochs": 1, "methods.clipit.epochs": 3, "methods.clipit.checkpoint_every": 2},
        ["unimodal", "clipit"],
    )
    proc = launch("--config", str(grid))
    jobs = job_lines(proc.stdout)
    yield {"folder": folder, "grid": grid, "jobs": jobs, "stdout": proc.stdout, "proc": proc}
    for array in {job.split("_")[0] for job, _ in jobs}:  # leave nothing running after a failure
        subprocess.run(["scancel", array], capture_output=True, timeout=30)


def test_grid_is_one_array_with_a_task_per_seed(grid_run):
    proc = grid_run["proc"]
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    jobs = grid_run["jobs"]
    assert len(jobs) == 4, grid_run["stdout"]
    arrays = {job.split("_")[0] for job, _ in jobs}
    assert len(arrays) == 1 and sorted(job.split("_")[1] for job, _ in jobs) == ["0", "1", "2", "3"]
    assert [label for _, label in jobs] == [f"seed={s}" for s in SEEDS]
    for line in ("unimodal     seed 0", "clipit       seed 3"):
        assert line in grid_run["stdout"]
    show = subprocess.run(["scontrol", "show", "job", arrays.pop()], capture_output=True, text=True).stdout
    assert "ArrayTaskThrottle=4" in show or not show.strip()  # already purged from slurmctld is fine too
    for (job, _), seed in zip(jobs, SEEDS):
        for method in ("unimodal", "clipit"):
            s = state(grid_run["folder"], method, seed)
            assert s.get("job_id") == job and s.get("state") in ("pending", "running", "done"), s


@pytest.mark.slow
def test_requeued_task_resumes_from_its_checkpoint(grid_run):
    t0 = time.monotonic()
    folder, (job, _) = grid_run["folder"], grid_run["jobs"][0]
    progress = run_dir(folder, "clipit", 0) / "checkpoints" / "latest" / "progress.json"

    def checkpointed():
        try:
            return json.loads(progress.read_text())["step"] >= 2
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            return False

    wait_for(checkpointed, 75, f"task {job} to write a CLIP-IT checkpoint")
    subprocess.run(["scontrol", "requeue", job], check=True, capture_output=True, timeout=30)
    done = run_dir(folder, "clipit", 0) / "metrics.json"
    wait_for(done.exists, 85, f"requeued task {job} to finish")
    summary = json.loads((run_dir(folder, "clipit", 0) / "train_summary.json").read_text())
    assert summary["resumed_from_step"] is not None and summary["resumed_from_step"] >= 2, summary
    assert summary["steps"] == 12
    # the cell's process writes metrics.json and exits; then the task marks it done
    wait_for(lambda: state(folder, "clipit", 0).get("state") == "done", 30, "the ledger to say done")
    s = state(folder, "clipit", 0)
    assert s["state"] == "done" and s["attempt"] >= 2 and s["job_id"] == job
    assert any(h["state"] == "running" and h.get("restart", 0) >= 1 for h in s["history"]), s["history"]
    # The unimodal cell finished before the requeue: the restarted task skipped it.
    assert state(folder, "unimodal", 0)["attempt"] == 1
    assert time.monotonic() - t0 < 150


def test_all_cells_finish_and_a_rerun_recomputes_nothing(grid_run):
    folder = grid_run["folder"]
    wait_for(
        lambda: all((run_dir(folder, m, s) / "metrics.json").exists() for m in ("unimodal", "clipit") for s in SEEDS),
        85,
        "all 8 cells",
    )
    wait_for(
        lambda: all(state(folder, m, s).get("state") == "done" for m in ("unimodal", "clipit") for s in SEEDS),
        20,
        "the ledger to say done",
    )
    before = {
        p: p.stat().st_mtime_ns
        for m in ("unimodal", "clipit")
        for s in SEEDS
        for p in (run_dir(folder, m, s) / f for f in CELL_FILES)
    }
    logs_before = set((folder / "runs" / "submitit").iterdir())
    proc = launch("--config", str(grid_run["grid"]))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "nothing to submit: cells 8 done" in proc.stdout
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert set((folder / "runs" / "submitit").iterdir()) == logs_before  # nothing was submitted


@pytest.mark.slow
def test_multi_task_cell_trains_as_one_process_group(slurm_cluster, tiny_shards, tmp_path):
    """nodes x tasks_per_node > 1: every task runs the cell; SLURM's env becomes torch.distributed's."""
    profile = tmp_path / "two-tasks.yaml"
    profile.write_text(
        "executor: slurm\npartition: debug\nnodes: 1\ntasks_per_node: 2\ncpus_per_task: 1\n"
        "mem_gb: 2\ntimeout_min: 10\nsetup: [export OMP_NUM_THREADS=1]\n"
    )
    grid = write_grid(tmp_path, tiny_shards, [0], {"methods.unimodal.epochs": 1}, ["unimodal"], name="ddp")
    proc = launch("--config", str(grid), "--profile", str(profile), "--wait", timeout=100)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads((run_dir(tmp_path, "unimodal", 0) / "train_summary.json").read_text())
    assert summary["world_size"] == 2
    assert state(tmp_path, "unimodal", 0)["state"] == "done"


@pytest.mark.slow
def test_reused_warm_start_waits_with_afterok(slurm_cluster, tiny_shards, tmp_path):
    """An ablation value that reuses the baseline's probe is a second array with afterok on its task."""
    lines = write_grid(
        tmp_path,
        tiny_shards,
        [0],
        {"methods.unimodal.epochs": 1, "methods.clipit.epochs": 1},
        ["unimodal", "clipit"],
        name="dep",
    ).read_text()
    lines = lines.replace('output_dir: "{root}/out"', 'output_dir: "{root}/{variant}"') + (
        "axes:\n  variant:\n    out: {}\n"
        "    lam0: {set: {methods.clipit.lam: 0.0}, methods: [clipit], warm_start_from: out}\n"
    )
    grid = tmp_path / "grid.yaml"
    grid.write_text(lines)
    proc = launch("--config", str(grid), "--wait", timeout=150)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    jobs = job_lines(proc.stdout)
    assert len(jobs) == 2 and f"(after {jobs[0][0]})" in proc.stdout
    lam0 = tmp_path / "runs" / "lam0" / "runs"
    assert (lam0 / "clipit" / "seed-0" / "metrics.json").exists()
    assert (lam0 / "unimodal" / "seed-0").is_symlink()


@pytest.mark.slow
def test_a_failed_task_is_quoted_and_queued_tasks_cancel(slurm_cluster, tiny_shards, tmp_path):
    """`--wait` quotes the failed cell's error line (not only the log path) and `grid status` shows it;
    `grid cancel` scancels the queued tasks of a grid from the ledger; no literal `%j/` log folder."""
    shards = Path(next(s for s in tiny_shards if s.startswith("shards.dir=")).split("=", 1)[1])
    broken = tmp_path / "shards"
    shutil.copytree(shards, broken)
    lost = sorted(broken.glob("train/*.tar"))[0]
    lost.unlink()  # a scratch purge took one shard: the manifest (what the pre-flight reads) still lists it
    sets = [s for s in tiny_shards if not s.startswith("shards.dir=")] + [f"shards.dir={broken}"]
    grid = write_grid(tmp_path, sets, [0], {"methods.unimodal.epochs": 1}, ["unimodal"], name="slurm-fail")
    proc = launch("--config", str(grid), "--wait", timeout=600)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    [failed] = [line for line in proc.stdout.splitlines() if line.startswith("FAILED job ")]
    assert "method=unimodal,seed=0: " in failed and " - /" not in failed, failed
    assert proc.stdout.count("waiting: cells: ") == 1 and "finished: cells: 1 failed;" in proc.stdout
    status = subprocess.run(
        [sys.executable, "-m", "clipit", "grid", "status", "--config", str(grid)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    [row] = [line for line in status.stdout.splitlines() if line.startswith("failed ")]
    assert failed.split("seed=0: ", 1)[1].startswith(row.split(None, 3)[3][:60]), (failed, row)
    logs = next((tmp_path / "runs" / "submitit").iterdir())
    assert "%j" not in [p.name for p in logs.iterdir()]

    later = tmp_path / "later"
    later.mkdir()
    grid = write_grid(later, tiny_shards, [0, 1], {}, ["unimodal"])
    grid.write_text(grid.read_text() + "resources: {additional: {begin: now+600}}\n")  # queued for 10 min
    proc = launch("--config", str(grid))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs = [job for job, _ in job_lines(proc.stdout)]
    cancel = subprocess.run(
        [sys.executable, "-m", "clipit", "grid", "cancel", "--config", str(grid)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cancel.returncode == 0 and f"cancelled 2 job(s) (2 cell(s)): {' '.join(sorted(jobs))}" in cancel.stdout

    def gone() -> bool:
        live = live_slurm_jobs()
        return live is not None and not set(jobs) & live

    wait_for(gone, 60, "the cancelled jobs to leave squeue")
    for seed, job in zip([0, 1], jobs):
        s = state(later, "unimodal", seed)
        assert s["state"] == "failed" and s["error"] == f"cancelled by `clipit grid cancel` (job {job})", s
