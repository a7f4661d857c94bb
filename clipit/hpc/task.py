"""What one array task runs on a compute node: the cells of its chain in order (warm starts first),
each as `clipit train ... --method M --seed S` in a process of its own (clipit/cells.py), with the
cell states recorded in the ledger by rank 0. With several ranks per task (nodes x tasks_per_node),
every rank runs this loop and starts its rank's process of each cell with the SLURM rank env.

`CellRunner` is the submitted submitit `Checkpointable`: on a timeout or preemption (USR2) submitit
requeues the same call, which skips finished cells and resumes the interrupted one from the trainer's
`checkpoints/latest/`. Planning and submitting live in clipit/hpc/submit.py (login node).
"""

from __future__ import annotations

import os
import socket
import sys
import traceback
from pathlib import Path

import submitit

from clipit import layout
from clipit.cells import ERROR_PREFIX, CellsFailed, last_error_line, run_cell
from clipit.hpc import ledger
from clipit.hpc.grid_cell import Cell, cell_changes, cell_is_done
from clipit.hpc.grid_tasks import Task
from clipit.io import read_json


def job_info(executor: str = "slurm") -> dict:
    """Who runs this task: job id (`<array>_<task>` on SLURM), host, restart count, rank."""
    info = {
        "host": socket.gethostname(),
        "restart": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
        "executor": executor,
    }
    try:
        env = submitit.JobEnvironment()
        info |= {"job_id": str(env.job_id), "rank": env.global_rank, "world": env.num_tasks}
    except Exception:  # not inside a submitit job (tests, direct calls)
        array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
        job = f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID") or str(os.getpid())
        info |= {
            "job_id": job,
            "rank": int(os.environ.get("RANK", "0")),
            "world": int(os.environ.get("WORLD_SIZE", "1")),
        }
    return info


def setup_distributed() -> None:
    """Several tasks per job (nodes x tasks_per_node > 1): export the torch.distributed env:// variables
    from SLURM so that the trainer's plain `Accelerator()` forms one process group (one task per GPU)."""
    try:
        env = submitit.JobEnvironment()
    except Exception:
        return
    if env.num_tasks > 1:
        # Each task sees the node's GPUs; Accelerate picks cuda:LOCAL_RANK, so keep CUDA_VISIBLE_DEVICES.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)


def train_cell(cell: Cell, slot: int = 0) -> dict:
    """`clipit train --config CFG --set ... --method M --seed S` in a process of its own, as the task's
    `slot`-th cell; returns its test metrics. A failure raises CellsFailed with the child's error line."""
    failure = run_cell(cell.argv(), slot)
    if failure is not None:
        raise CellsFailed(failure)
    return read_json(layout.metrics_file(cell.run_dir))


def warm_start_dir(cell: Cell) -> Path | None:
    """Where `train_and_evaluate` looks for this cell's warm start (a sibling method's run dir)."""
    if cell.warm_start is None:
        return None
    return layout.sibling(cell.run_dir, cell.warm_start)


def link_warm_start(cell: Cell) -> None:
    """Reuse another axis value's warm start: a relative symlink in this cell's output_dir."""
    target, link = Path(cell.warm_start_link), warm_start_dir(cell)
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink():
        if os.path.realpath(link) == os.path.realpath(target):
            return
        link.unlink()
    elif link.exists():
        return  # trained in place earlier: keep it
    try:
        os.symlink(os.path.relpath(target, link.parent), link, target_is_directory=True)
    except FileExistsError:  # another rank made it
        pass


def run_task(task: Task, train=train_cell, executor: str = "slurm", changes=cell_changes) -> dict:
    """Run a task's cells in order; returns {cell key: outcome}. Raises CellsFailed if any failed.

    A finished cell is skipped unless it was made under another config than the cell's (the grid file or a
    config it names was edited after submission): that cell runs, and its train stops with the one line
    naming the changed keys, recorded as its failure. A cell whose warm start failed in this task is marked failed without
    running, and the other cells still run (ablation variants do not depend on each other).
    """
    os.chdir(task.workdir)
    setup_distributed()
    job = job_info(executor)
    rank0 = job.get("rank", 0) == 0
    outcomes: dict[str, str] = {}
    failed_dirs: set[str] = set()
    for slot, cell in enumerate(task.cells):
        if cell_is_done(cell) and not changes(cell):
            if rank0 and (ledger.read_state(cell.run_dir) or {}).get("state") != "done":
                ledger.mark_done(cell.run_dir, job, note="already finished")
            outcomes[cell.key] = "skipped (done)"
            continue
        warm = cell.warm_start_link or (str(warm_start_dir(cell)) if cell.warm_start else None)
        if warm is not None and os.path.realpath(warm) in failed_dirs:
            if rank0:
                ledger.mark_failed(cell.run_dir, f"warm start {cell.warm_start} failed in this task ({warm})", job)
            failed_dirs.add(os.path.realpath(cell.run_dir))
            outcomes[cell.key] = "failed (warm start failed)"
            continue
        if cell.warm_start_link:
            link_warm_start(cell)
        if rank0:
            ledger.mark_running(cell.run_dir, job | {"command": cell.command()})
        print(f"[clipit grid] {cell.key}: {cell.command()}", flush=True)
        try:
            metrics = train(cell, slot)
        except Exception as err:  # the cell's own output (its traceback, if any) is in this job's log above
            text = str(err) if isinstance(err, CellsFailed) else traceback.format_exc()
            if not isinstance(err, CellsFailed):
                print(f"[clipit grid] {cell.key}: failed: {text}", file=sys.stderr, flush=True)
            # the line the launcher's FAILED summary and `clipit grid status` quote
            print(f"{ERROR_PREFIX} {cell.key}: {last_error_line(text)}", file=sys.stderr, flush=True)
            if rank0:
                ledger.mark_failed(cell.run_dir, text, job)
            failed_dirs.add(os.path.realpath(cell.run_dir))
            outcomes[cell.key] = "failed"
            continue
        if rank0:
            keep = {k: metrics.get(k) for k in ("balanced_accuracy", "accuracy") if isinstance(metrics, dict)}
            ledger.mark_done(cell.run_dir, job, metrics=keep)
        outcomes[cell.key] = "done"
    failed = [k for k, v in outcomes.items() if v.startswith("failed")]
    if failed:
        raise CellsFailed(
            f"{len(failed)} of {len(task.cells)} cells failed: {', '.join(failed)} "
            "(their error lines are in their state.json, their output in this job's log)"
        )
    return outcomes


class CellRunner(submitit.helpers.Checkpointable):
    """The submitted callable. `checkpoint()` (inherited) resubmits the same task on timeout or
    preemption; the rerun skips finished cells and the trainer resumes from checkpoints/latest/."""

    def __init__(self, executor: str = "slurm"):
        self.executor = executor

    def __call__(self, task: Task) -> dict:
        return run_task(task, executor=self.executor)

    def checkpoint(self, *args, **kwargs):
        print(
            f"[clipit grid] checkpoint: requeueing {args[0].label if args else ''} "
            f"(restart {os.environ.get('SLURM_RESTART_COUNT', '0')})",
            flush=True,
        )
        return super().checkpoint(*args, **kwargs)
