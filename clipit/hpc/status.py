"""`clipit grid status` and `clipit grid cancel`, and the progress lines of `clipit grid --wait`: a grid's
cells as the ledger (clipit/hpc/ledger.py) and the scheduler see them.

    clipit grid status --config GRID [--root R] [--set K=V ...]   # table by state, counts, ETA
    clipit grid cancel --config GRID [--root R] [--set K=V ...]   # scancel the grid's queued/running jobs

A cell's shown state comes from `ledger.classify` (the artifacts, the state file and squeue): done,
running, queued, failed (with the error line its task recorded), lost (its job is gone: a rerun
resubmits it), unknown (the scheduler did not answer, or the state file is unreadable) and not
submitted. Any other classification is shown under its own name, after these.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

from clipit.cells import last_error_line
from clipit.errors import ClipitError
from clipit.hpc import ledger
from clipit.hpc.grid import Plan, expand
from clipit.hpc.grid_cell import Cell, cell_is_done

# The order of the table and of the counts; a state not listed here comes after them.
SHOWN = ("done", "running", "queued", "failed", "lost", "unknown", "not submitted")
CANCELLED = "cancelled by `clipit grid cancel`"


class CancelError(ClipitError):
    """scancel is missing or refused (its stderr is the message)."""

    exit_code = 1


@dataclass(frozen=True)
class CellStatus:
    cell: Cell
    state: str  # one of SHOWN, or a classification added later
    job_id: str | None
    detail: str  # failed: its error line; unknown: why
    record: dict  # the state file's content ({} when none or unreadable)


def shown_state(status: str, record: dict | None) -> str:
    """The table's name for a ledger classification: in flight splits into running and queued."""
    if status == "in-flight":
        return "running" if (record or {}).get("state") == "running" else "queued"
    return {"new": "not submitted"}.get(status, status)


def grid_status(plan: Plan, alive: Callable[[dict], bool | None] | None = None) -> list[CellStatus]:
    alive = alive or ledger.JobChecker()
    rows = []
    for cell in plan.cells:
        status, record = ledger.classify(cell.run_dir, cell_is_done(cell), alive)
        record = record or {}
        state = shown_state(status, record)
        detail = ""
        if state == "failed":
            detail = last_error_line(str(record.get("error") or "no error recorded"))
        elif record.get("unreadable"):
            detail = record["unreadable"]
        elif state == "unknown":
            detail = "squeue did not answer"
        job = record.get("job_id")
        rows.append(CellStatus(cell, state, str(job) if job else None, detail, record))
    return rows


def _rank(state: str) -> int:
    return SHOWN.index(state) if state in SHOWN else len(SHOWN)


def counts_line(rows: list[CellStatus]) -> str:
    counts: dict[str, int] = {}
    for row in sorted(rows, key=lambda r: _rank(r.state)):
        counts[row.state] = counts.get(row.state, 0) + 1
    return ", ".join(f"{n} {state}" for state, n in counts.items()) or "no cells"


def _seconds(record: dict, start: str, end: str) -> float | None:
    try:
        return (_dt.datetime.fromisoformat(record[end]) - _dt.datetime.fromisoformat(record[start])).total_seconds()
    except (KeyError, TypeError, ValueError):
        return None


def eta_line(rows: list[CellStatus], now: _dt.datetime | None = None) -> str:
    """Time left for the running and queued cells: their method's mean time over the finished cells that
    recorded a start (else the mean over all of them), spread over as many cells as run now."""
    now = now or _dt.datetime.now().astimezone()
    took: dict[str, list[float]] = {}
    for row in rows:
        seconds = _seconds(row.record, "started", "finished") if row.state == "done" else None
        if seconds is not None and seconds >= 0:
            took.setdefault(row.cell.method, []).append(seconds)
    left = [r for r in rows if r.state in ("running", "queued")]
    if not left:
        return "ETA: nothing running or queued"
    every = [s for values in took.values() for s in values]
    if not every:
        return f"ETA: unknown until a cell finishes ({len(left)} running or queued)"
    remaining = 0.0
    for row in left:
        mean = sum(took.get(row.cell.method, every)) / len(took.get(row.cell.method, every))
        elapsed = 0.0
        if row.state == "running":
            started = row.record.get("started")
            try:
                elapsed = (now - _dt.datetime.fromisoformat(started)).total_seconds() if started else 0.0
            except ValueError:
                elapsed = 0.0
        remaining += max(0.0, mean - elapsed)
    width = max(1, sum(r.state == "running" for r in rows))
    minutes = remaining / width / 60
    return (
        f"ETA: ~{_duration(minutes)} for {len(left)} running or queued cell(s) at {width} at a time "
        f"(mean of {len(every)} finished cell(s) per method)"
    )


def _duration(minutes: float) -> str:
    return f"{minutes:.0f} min" if minutes < 90 else f"{minutes / 60:.1f} h"


def progress_line(plan: Plan) -> str:
    """One line for `clipit grid --wait`: the counts and the ETA."""
    rows = grid_status(plan)
    return f"cells: {counts_line(rows)}; {eta_line(rows)}"


def print_status(plan: Plan, rows: list[CellStatus], out=print) -> None:
    out(f"grid {plan.grid.name}: {len(plan.cells)} cells; root {plan.root}")
    width = max([len(r.cell.key) for r in rows] + [4])
    out(f"{'STATE':<14} {'CELL':<{width}} {'JOB':<12} DETAIL")
    for row in sorted(rows, key=lambda r: _rank(r.state)):
        out(f"{row.state:<14} {row.cell.key:<{width}} {row.job_id or '-':<12} {row.detail or row.cell.run_dir}")
    out(f"cells: {counts_line(rows)}")
    out(eta_line(rows))


def cancel(plan: Plan, out=print, run=subprocess.run) -> int:
    """Cancel the queued and running jobs of the grid's cells (scancel; local jobs: SIGTERM to their
    process) and record the cells as failed, cancelled; returns how many jobs were cancelled."""
    rows = [r for r in grid_status(plan) if r.state in ("running", "queued") and r.job_id]
    if not rows:
        out(f"nothing to cancel: cells {counts_line(grid_status(plan))}")
        return 0
    slurm = sorted({r.job_id for r in rows if r.record.get("executor") not in ("local", "debug")})
    local = sorted({r.job_id for r in rows if r.record.get("executor") in ("local", "debug")})
    if slurm:
        if shutil.which("scancel") is None:
            raise CancelError(f"scancel not found: cannot cancel SLURM job(s) {' '.join(slurm)} from this machine")
        proc = run(["scancel", *slurm], capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise CancelError(f"scancel {' '.join(slurm)} failed: {' '.join(proc.stderr.split())}")
    for pid in local:
        try:
            os.kill(int(pid), signal.SIGTERM)
        except (ProcessLookupError, ValueError):
            pass
    for row in rows:
        job = row.job_id

        def still_this_job(current: dict | None, job=job) -> bool:
            return (
                bool(current) and current.get("state") in ("pending", "running") and str(current.get("job_id")) == job
            )

        ledger.update(row.cell.run_dir, "failed", only_if=still_this_job, error=f"{CANCELLED} (job {job})")
    jobs = slurm + local
    out(f"cancelled {len(jobs)} job(s) ({len(rows)} cell(s)): {' '.join(jobs)}")
    return len(jobs)


def grid_status_command(query) -> int:
    """`clipit grid status`: exit 0 (a failed cell is a state shown, not an error of this command)."""
    plan = expand(query.grid, list(query.overrides), root=query.root)
    print_status(plan, grid_status(plan))
    return 0


def grid_cancel_command(query) -> int:
    cancel(expand(query.grid, list(query.overrides), root=query.root))
    return 0
