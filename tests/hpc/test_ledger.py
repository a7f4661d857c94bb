"""Per-cell state files (clipit/hpc/ledger.py) and what a rerun does with each state."""

import json
import multiprocessing
import os

import pytest

from clipit.hpc import ledger
from clipit.hpc.grid import Plan
from clipit.hpc.grid_cell import Cell
from clipit.hpc.grid_file import GridConfig
from clipit.hpc.grid_tasks import Task
from clipit.hpc.submit import tasks_to_submit


def test_transitions_and_history(tmp_path):
    run = tmp_path / "run"
    ledger.mark_submitting(run, {"key": "k"}, "slurm", "/logs")
    assert ledger.read_state(run)["state"] == "pending" and ledger.read_state(run)["job_id"] is None
    ledger.mark_submitted(run, "12_3")
    ledger.mark_running(run, {"job_id": "12_3", "host": "n1", "restart": 0})
    ledger.mark_failed(run, "Traceback ...\nValueError: boom", {"job_id": "12_3"})
    state = ledger.read_state(run)
    assert state["state"] == "failed" and state["error"].endswith("boom") and state["attempt"] == 1
    ledger.mark_running(run, {"job_id": "13_0", "host": "n2", "restart": 1})
    ledger.mark_done(run, {"job_id": "13_0"}, metrics={"balanced_accuracy": 0.5})
    state = ledger.read_state(run)
    assert state["state"] == "done" and "error" not in state and state["attempt"] == 2
    assert [h["state"] for h in state["history"]] == ["pending", "pending", "running", "failed", "running", "done"]
    assert state["cell"] == {"key": "k"} and state["metrics"]["balanced_accuracy"] == 0.5
    assert sorted(p.name for p in run.iterdir()) == [".state.lock", "state.json"]  # no temp files left
    with pytest.raises(ValueError):
        ledger.update(run, "finished")


def test_submitted_never_undoes_a_started_task(tmp_path):
    run = tmp_path / "run"
    ledger.mark_submitting(run, {}, "slurm", "/logs")
    ledger.mark_running(run, {"job_id": "7_1"})  # the task started before the launcher recorded its id
    ledger.mark_submitted(run, "7_1")
    assert ledger.read_state(run)["state"] == "running"
    ledger.mark_done(run, {"job_id": "7_1"})
    ledger.mark_submitted(run, "7_1")
    assert ledger.read_state(run)["state"] == "done"


def _hammer(run, n):
    for i in range(n):
        ledger.update(run, "running", note=f"{os.getpid()}-{i}")


def test_concurrent_writers_keep_the_file_valid(tmp_path):
    run = tmp_path / "run"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_hammer, args=(run, 40)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    state = json.loads((run / "state.json").read_text())
    assert len(state["history"]) == ledger.HISTORY  # 120 updates, none lost to a torn read, last 50 kept


@pytest.mark.parametrize(
    "done,state,alive,expected",
    [
        (True, "failed", None, "done"),  # artifacts are the truth
        (False, None, None, "new"),
        (False, "failed", None, "failed"),
        (False, "pending", True, "in-flight"),
        (False, "running", False, "lost"),
        (False, "running", None, "unknown"),
        (False, "done", None, "new"),  # outputs deleted: train again
    ],
)
def test_classify(tmp_path, done, state, alive, expected):
    if state:
        ledger.update(tmp_path, state, job_id="5_0", executor="slurm")
    assert ledger.classify(tmp_path, done, lambda s: alive)[0] == expected


def test_job_checker_asks_squeue_once():
    calls = []

    def squeue():
        calls.append(1)
        return {"10_0", "10_1", "11"}

    alive = ledger.JobChecker(squeue)
    assert alive({"job_id": "10_1", "executor": "slurm"}) is True
    assert alive({"job_id": "10_2", "executor": "slurm"}) is False
    assert alive({"job_id": "11", "executor": "slurm"}) is True
    assert alive({"job_id": None, "executor": "slurm"}) is False  # died before its id was recorded
    assert len(calls) == 1
    assert ledger.JobChecker(lambda: None)({"job_id": "3", "executor": "slurm"}) is None
    local = ledger.JobChecker(lambda: set())
    assert local({"job_id": str(os.getpid()), "executor": "local"}) is True
    assert local({"job_id": "999999999", "executor": "local"}) is False


def _plan(tmp_path, n_tasks=3):
    tasks = []
    for i in range(n_tasks):
        cells = [Cell("g", (("v", str(i)),), m, m, 0, "c.yaml", (), str(tmp_path / str(i) / m)) for m in ("u", "c")]
        tasks.append(Task(cells, str(tmp_path)))
    return Plan(
        GridConfig(name="g", base="c.yaml"), "g.yaml", str(tmp_path), [c for t in tasks for c in t.cells], tasks
    )


def test_rerun_skips_done_and_in_flight_and_resubmits_failed_and_lost(tmp_path):
    plan = _plan(tmp_path, 5)
    status = ["done", "in-flight", "failed", "lost", "unknown"]
    statuses = {}
    for task, s in zip(plan.tasks, status):
        statuses[task.cells[0].run_dir] = ("done", None)
        statuses[task.cells[1].run_dir] = (s, {"job_id": "9_0"})
    todo, notes = tasks_to_submit(plan, statuses)
    assert [t.label for t in todo] == ["v=2,seed=0", "v=3,seed=0"]
    assert any("still queued or running" in n for n in notes) and any("unknown" in n for n in notes)
    todo, _ = tasks_to_submit(plan, statuses, force_unknown=True)
    assert [t.label for t in todo] == ["v=2,seed=0", "v=3,seed=0", "v=4,seed=0"]


def test_waiting_task_is_held_back_with_its_unsubmitted_warm_start(tmp_path):
    plan = _plan(tmp_path, 2)
    plan.tasks[1].after = [0]
    statuses = {c.run_dir: ("unknown", {"job_id": "4_0"}) for c in plan.tasks[0].cells}
    statuses |= {c.run_dir: ("new", None) for c in plan.tasks[1].cells}
    todo, notes = tasks_to_submit(plan, statuses)
    assert todo == [] and any("warm start was not submitted" in n for n in notes)
    statuses |= {c.run_dir: ("in-flight", {"job_id": "4_0"}) for c in plan.tasks[0].cells}
    todo, _ = tasks_to_submit(plan, statuses)
    assert todo == [plan.tasks[1]]  # submitted with afterok on the running job
