"""Per-cell state for grid runs: `<run_dir>/state.json`, written atomically under a lock.

States (what the file says):
    pending   submitted; `job_id` names the array task that will run it
    running   a task started it (host, attempt, SLURM restart count)
    done      trained and evaluated (train_summary.json + metrics.json exist)
    failed    the task raised (last lines of the traceback in `error`)

A finished cell whose recorded identity differs from the config asked for now is *changed*, not done
(clipit/hpc/submit.py::cell_statuses; the changed keys are shown and its task is not submitted).

The artifacts are the ground truth for *done*: a rerun skips a cell whose train_summary.json and
metrics.json exist, whatever the file says. For the other states the launcher asks the scheduler:
a pending/running cell whose job is still queued or running is *in flight* and is not submitted
again; one whose job is gone (cancelled, node lost, launcher killed) is *lost* and is resubmitted,
like a failed one. Each transition is appended to `history` (the last 50 are kept).

Writers: the launcher (pending, job id) and the task's rank 0 (running, done, failed). A task can
start before the launcher has recorded its job id, so every update is a read-modify-write under an
advisory lock (flock on `<run_dir>/.state.lock`), and the launcher never turns a state that a task
of the same job already advanced back into `pending`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import getpass
import json
import os
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path

from clipit import layout
from clipit.io import atomic_write_json

LOCK_FILE = ".state.lock"
STATES = ("pending", "running", "done", "failed")
HISTORY = 50


def _now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


class UnreadableState(Exception):
    """A state.json that exists but cannot be read (hand-edited, another tool, a disk error)."""


def load_state(run_dir: str | Path) -> dict | None:
    """The state file's content; None when there is none; UnreadableState (saying why) when it exists but
    is not a JSON object. Written atomically, so never half-written, but it can be edited or damaged."""
    path = layout.state_file(run_dir)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        raise UnreadableState(f"{path}: not UTF-8 text") from None
    except OSError as err:
        raise UnreadableState(f"{path}: cannot read ({err.strerror or type(err).__name__})") from None
    try:
        state = json.loads(text)
    except json.JSONDecodeError as err:
        raise UnreadableState(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(state, dict):
        raise UnreadableState(f"{path}: holds a JSON {type(state).__name__}, not an object")
    return state


def read_state(run_dir: str | Path) -> dict | None:
    """For writers: the current state, or None when there is none or it is unreadable (the writer then
    starts a fresh one). A rerun's decision uses `classify`, which calls an unreadable state unknown."""
    try:
        return load_state(run_dir)
    except UnreadableState:
        return None


@contextlib.contextmanager
def _locked(run_dir: Path):
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX)
        except (ImportError, OSError):  # no flock on this filesystem: atomic replace still holds
            pass
        yield
    finally:
        os.close(fd)


def update(
    run_dir: str | Path, state: str, *, only_if: Callable[[dict | None], bool] | None = None, **fields
) -> dict | None:
    """Set `state` (and `fields`) atomically; with `only_if`, only when it accepts the current state."""
    if state not in STATES:
        raise ValueError(f"unknown cell state {state!r}; one of {STATES}")
    run_dir = Path(run_dir)
    with _locked(run_dir):
        current = read_state(run_dir)
        if only_if is not None and not only_if(current):
            return current
        now = _now()
        entry = {"state": state, "time": now} | {
            k: v for k, v in fields.items() if k in ("job_id", "host", "restart", "error", "note")
        }
        history = ((current or {}).get("history") or []) + [entry]
        new = (current or {}) | fields | {"state": state, "updated": now, "history": history[-HISTORY:]}
        if state != "failed":
            new.pop("error", None)
        atomic_write_json(layout.state_file(run_dir), new)
        return new


# ---------------------------------------------------------------------------------------------
# Writers


def mark_submitting(run_dir: str | Path, cell: dict, executor: str, log_dir: str) -> dict | None:
    """Before submission: pending without a job id yet (a crash between here and the id is 'lost')."""
    return update(
        run_dir,
        "pending",
        cell=cell,
        executor=executor,
        log_dir=log_dir,
        job_id=None,
        submitted=_now(),
        note="submitting",
    )


def mark_submitted(run_dir: str | Path, job_id: str) -> dict | None:
    """Record the job id, unless the task already started (it records its own id) or finished."""

    def still_waiting(current: dict | None) -> bool:
        return current is None or (current.get("state") == "pending" and current.get("job_id") in (None, job_id))

    return update(run_dir, "pending", only_if=still_waiting, job_id=job_id, note="submitted")


def mark_running(run_dir: str | Path, job: dict) -> dict | None:
    current = read_state(run_dir) or {}
    attempt = int(current.get("attempt", 0)) + 1
    return update(run_dir, "running", attempt=attempt, started=_now(), **job)


def mark_done(run_dir: str | Path, job: dict | None = None, **fields) -> dict | None:
    return update(run_dir, "done", finished=_now(), **(job or {}), **fields)


def mark_failed(run_dir: str | Path, error: str, job: dict | None = None) -> dict | None:
    return update(run_dir, "failed", finished=_now(), error=error[-4000:], **(job or {}))


# ---------------------------------------------------------------------------------------------
# Readers: what a rerun does with each cell


def live_slurm_jobs(user: str | None = None) -> set[str] | None:
    """Ids (`123`, `123_4`) of this user's queued or running jobs; None if squeue cannot answer."""
    if shutil.which("squeue") is None:
        return None
    user = user or getpass.getuser()
    try:
        proc = subprocess.run(
            ["squeue", "-h", "-r", "-u", user, "-o", "%i"], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    return {line.strip() for line in proc.stdout.splitlines() if line.strip()}


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X", "x")


class JobChecker:
    """Is the job that holds a pending/running cell still alive? True, False, or None (cannot tell)."""

    def __init__(self, slurm_jobs: Callable[[], set[str] | None] = live_slurm_jobs):
        self._slurm_jobs = slurm_jobs
        self._cache: set[str] | None = None
        self._asked = False

    def __call__(self, state: dict) -> bool | None:
        job_id = state.get("job_id")
        if not job_id:
            return False  # the launcher died between submitting and recording: nothing to wait for
        if state.get("executor") in ("local", "debug"):
            if state.get("host") not in (None, socket.gethostname()):
                return None
            return str(job_id).isdigit() and pid_alive(int(job_id))
        if not self._asked:
            self._cache, self._asked = self._slurm_jobs(), True
        if self._cache is None:
            return None
        return str(job_id) in self._cache


def classify(run_dir: str | Path, done: bool, alive: Callable[[dict], bool | None]) -> tuple[str, dict | None]:
    """One of: done, new, failed, in-flight, lost, unknown (+ the state file's content).

    A state file that exists but cannot be read, or names no known state, is *unknown*, never *new*:
    a task of a live job may be running the cell. The returned dict then holds only `unreadable`,
    the reason."""
    try:
        state = load_state(run_dir)
    except UnreadableState as err:
        return ("done", None) if done else ("unknown", {"unreadable": str(err)})
    if done:
        return "done", state
    if state is None:
        return "new", None
    s = state.get("state")
    if s == "failed":
        return "failed", state
    if s in ("pending", "running"):
        live = alive(state)
        return ({True: "in-flight", False: "lost", None: "unknown"}[live]), state
    if s == "done":
        return "new", state  # "done" without artifacts: deleted outputs, train again
    return "unknown", state | {"unreadable": f"{layout.state_file(run_dir)}: unknown state {s!r} (one of {STATES})"}


def summarize(statuses: Iterable[str]) -> str:
    counts: dict[str, int] = {}
    for s in statuses:
        counts[s] = counts.get(s, 0) + 1
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
