"""`clipit grid status` and `clipit grid cancel` on a grid whose cells' ledger and run files are on disk
as the tasks leave them, and the failed-job line of `--wait` (a real local submitit job)."""

import json
import os
import socket
import subprocess
import sys

from clipit import layout
from clipit.cells import ERROR_PREFIX
from clipit.hpc import ledger
from clipit.hpc.cluster import ClusterProfile
from clipit.hpc.executor import make_executor, wait_for_jobs
from clipit.hpc.grid import expand
from clipit.hpc.status import grid_status, progress_line
from clipit_testing import ROOT, cli

ERROR = "methods.clipit: shards.dir /x/shards: manifest.json not found; run `clipit shard build` first"


def demo_grid(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        f"name: st\nbase: {ROOT / 'configs/demo-tiny.yaml'}\nroot: {tmp_path / 'runs'}\nprofile: local-cluster\n"
        "seeds: [0, 1, 2]\nmethods: [unimodal, clipit]\nset: {output_dir: '{root}/demo'}\n"
    )
    return grid


def submitted(cell, job_id, executor="local"):
    ledger.mark_submitting(cell.run_dir, cell.to_dict(), executor, "/logs")
    ledger.mark_submitted(cell.run_dir, job_id)


def running(cell, job_id):
    submitted(cell, job_id)
    ledger.mark_running(cell.run_dir, {"job_id": job_id, "host": socket.gethostname(), "executor": "local"})


def test_status_shows_done_running_queued_failed_and_unsubmitted_cells(tmp_path):
    grid = demo_grid(tmp_path)
    cells = {(c.method, c.seed): c for c in expand(grid).cells}
    me = str(os.getpid())  # a live local "job": the ledger's liveness check reads /proc
    done = cells[("unimodal", 0)]
    running(done, "101")
    for path in (layout.train_summary(done.run_dir), layout.metrics_file(done.run_dir)):
        path.write_text(json.dumps({"balanced_accuracy": 0.5}))
    ledger.mark_done(done.run_dir, {"job_id": "101"})
    ledger.update(done.run_dir, "done", started="2026-01-01T10:00:00+00:00", finished="2026-01-01T10:10:00+00:00")
    failed = cells[("clipit", 0)]
    running(failed, "101")
    ledger.mark_failed(failed.run_dir, f"Traceback (most recent call last):\n  ...\n{ERROR}\n")
    running(cells[("unimodal", 1)], me)
    submitted(cells[("clipit", 1)], me)

    proc = cli("grid", "status", "--config", str(grid))
    assert proc.returncode == 0, proc.stderr
    rows = {tuple(line.split()[:2]): line for line in proc.stdout.splitlines()[2:8]}
    assert rows[("done", "method=unimodal,seed=0")].split()[2] == "101"
    assert rows[("failed", "method=clipit,seed=0")].endswith(f" {ERROR}")
    assert ("running", "method=unimodal,seed=1") in rows and ("queued", "method=clipit,seed=1") in rows
    assert sum(line.startswith("not submitted") for line in proc.stdout.splitlines()) == 2
    assert "cells: 1 done, 1 running, 1 queued, 1 failed, 2 not submitted" in proc.stdout
    # 10 min per cell from the finished one: the running and the queued cell, one at a time
    assert "ETA: ~20 min for 2 running or queued cell(s) at 1 at a time" in proc.stdout
    plan = expand(grid)
    assert progress_line(plan).startswith("cells: 1 done, 1 running, 1 queued, 1 failed, 2 not submitted; ETA: ~")
    moved = cli("grid", "status", "--config", str(grid), "--root", str(tmp_path / "other"))
    assert "cells: 6 not submitted" in moved.stdout and str(tmp_path / "other" / "demo") in moved.stdout


def test_cancel_stops_the_grids_jobs_and_records_it(tmp_path):
    grid = demo_grid(tmp_path)
    cell = expand(grid).cells[0]
    job = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # the local job's process
    try:
        submitted(cell, str(job.pid))
        proc = cli("grid", "cancel", "--config", str(grid))
        assert proc.returncode == 0, proc.stderr
        assert f"cancelled 1 job(s) (1 cell(s)): {job.pid}" in proc.stdout
        assert job.wait(timeout=30) == -15
    finally:
        job.kill()
    [row] = [r for r in grid_status(expand(grid)) if r.cell.run_dir == cell.run_dir]
    assert row.state == "failed" and row.detail == f"cancelled by `clipit grid cancel` (job {job.pid})"
    again = cli("grid", "cancel", "--config", str(grid))
    assert again.returncode == 0 and "nothing to cancel" in again.stdout


def test_a_failed_jobs_line_quotes_the_error_line_of_its_log(tmp_path):
    profile = ClusterProfile(executor="local", timeout_min=5, cpus_per_task=1, mem_gb=1)
    # a task's last words: its `clipit: error:` line on stderr, then the exception submitit records
    script = f"echo '[clipit grid] training ...'; echo '{ERROR_PREFIX} method=clipit,seed=0: {ERROR}' >&2; exit 3"
    job = make_executor(profile, tmp_path, "t", "local").submit(subprocess.run, ["sh", "-c", script], check=True)
    lines = []
    assert wait_for_jobs([job], out=lines.append, every=0.5) == 1
    assert lines[0].startswith("waiting: ") and lines[-2] == "finished: 1 of 1 job(s) finished"
    assert lines[-1] == f"FAILED job {job.job_id}: method=clipit,seed=0: {ERROR} (log: {job.paths.stdout})"
    assert "%j" not in {p.name for p in tmp_path.iterdir()}  # submitit's template is not left as a folder
