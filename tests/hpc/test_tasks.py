"""What an array task does (clipit.hpc.task.run_task) with a stand-in for training: order, skips,
failure isolation, ledger states, shared warm starts; and the launcher's dependency wiring."""

import json
import os
from pathlib import Path

import pytest

from clipit.hpc import ledger
from clipit.hpc.grid import Plan
from clipit.hpc.grid_cell import Cell
from clipit.hpc.grid_file import GridConfig
from clipit.hpc.grid_tasks import Task
from clipit.hpc.submit import dependency_ids
from clipit.hpc.task import CellRunner, CellsFailed, link_warm_start, run_task


@pytest.fixture(autouse=True)
def _restore_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # run_task changes into the task's workdir


def cell(root: Path, method: str, warm: str | None = None, seed: int = 0, out: str = "out", link: str | None = None):
    run = root / out / "runs" / method / f"seed-{seed}"
    return Cell("g", (("variant", out),), method, method, seed, "c.yaml", (), str(run), warm, link)


def unchanged(c: Cell) -> str:
    return ""  # the stand-in runs record no identity: every finished one is current


def fake_train(fail: set[str] = frozenset(), calls: list | None = None):
    def train(c: Cell, slot: int = 0) -> dict:
        if calls is not None:
            calls.append(c.method)
        warm = Path(c.run_dir).parent.parent / c.warm_start / Path(c.run_dir).name if c.warm_start else None
        if warm is not None and not (warm / "train_summary.json").exists():
            raise RuntimeError(f"warm start {warm} missing")
        if c.method in fail:
            raise ValueError(f"{c.method} diverged")
        run = Path(c.run_dir)
        run.mkdir(parents=True, exist_ok=True)
        (run / "train_summary.json").write_text("{}")
        (run / "metrics.json").write_text(json.dumps({"balanced_accuracy": 0.75}))
        return {"balanced_accuracy": 0.75}

    return train


def test_chain_runs_in_order_and_records_states(tmp_path):
    cells = [cell(tmp_path, "unimodal"), cell(tmp_path, "clipit", "unimodal"), cell(tmp_path, "text")]
    calls = []
    out = run_task(Task(cells, str(tmp_path)), train=fake_train(calls=calls))
    assert calls == ["unimodal", "clipit", "text"] and set(out.values()) == {"done"}
    for c in cells:
        state = ledger.read_state(c.run_dir)
        assert state["state"] == "done" and state["metrics"]["balanced_accuracy"] == 0.75
        assert state["command"].startswith("clipit train") and [h["state"] for h in state["history"]] == [
            "running",
            "done",
        ]
    calls.clear()
    out = run_task(Task(cells, str(tmp_path)), train=fake_train(calls=calls), changes=unchanged)  # a requeue or a rerun
    assert calls == [] and set(out.values()) == {"skipped (done)"}


def test_a_finished_cell_of_another_config_runs_again_and_its_train_decides(tmp_path):
    """The grid file was edited after submission: the finished cell is not skipped as done; its train runs
    (and, for real, stops with the line naming the changed keys, recorded as the cell's failure)."""
    cells = [cell(tmp_path, "unimodal"), cell(tmp_path, "text")]
    run_task(Task(cells, str(tmp_path)), train=fake_train(), changes=unchanged)
    calls = []
    edited = {cells[0].key: "methods.unimodal.lr: 0.001 then, 0.01 now"}
    out = run_task(Task(cells, str(tmp_path)), train=fake_train(calls=calls), changes=lambda c: edited.get(c.key, ""))
    assert calls == ["unimodal"] and out == {cells[0].key: "done", cells[1].key: "skipped (done)"}


def test_failed_warm_start_blocks_its_dependents_only(tmp_path):
    cells = [cell(tmp_path, "unimodal"), cell(tmp_path, "clipit", "unimodal"), cell(tmp_path, "text")]
    calls = []
    with pytest.raises(CellsFailed, match="2 of 3 cells failed"):
        run_task(Task(cells, str(tmp_path)), train=fake_train({"unimodal"}, calls))
    assert calls == ["unimodal", "text"]  # clipit not attempted, text (independent) still ran
    states = {c.method: ledger.read_state(c.run_dir) for c in cells}
    assert states["unimodal"]["state"] == "failed" and "diverged" in states["unimodal"]["error"]
    assert states["clipit"]["state"] == "failed" and "warm start unimodal failed" in states["clipit"]["error"]
    assert states["text"]["state"] == "done"


def test_shared_warm_start_is_linked_relatively(tmp_path):
    source = cell(tmp_path, "unimodal", out="full")
    fake_train()(source)
    variant = cell(tmp_path, "clipit", "unimodal", out="lam0", link=source.run_dir)
    run_task(Task([variant], str(tmp_path)), train=fake_train())
    link = tmp_path / "lam0" / "runs" / "unimodal" / "seed-0"
    assert link.is_symlink() and not os.readlink(link).startswith("/")
    assert os.path.realpath(link) == os.path.realpath(source.run_dir)
    link_warm_start(variant)  # idempotent
    assert ledger.read_state(variant.run_dir)["state"] == "done"
    assert ledger.read_state(source.run_dir) is None  # the source's ledger is its own task's business


def test_runner_is_checkpointable_and_resubmits_the_same_task(tmp_path):
    runner = CellRunner("slurm")
    task = Task([cell(tmp_path, "unimodal")], str(tmp_path))
    delayed = runner.checkpoint(task)
    assert delayed.function is runner and delayed.args == (task,)


def test_dependencies_point_at_new_or_running_jobs(tmp_path):
    tasks = [Task([cell(tmp_path, "unimodal", out=str(i))], str(tmp_path)) for i in range(3)]
    tasks.append(Task([cell(tmp_path, "clipit", "unimodal", out="v")], str(tmp_path), after=[0, 1, 2]))
    plan = Plan(
        GridConfig(name="g", base="c.yaml"), "g.yaml", str(tmp_path), [c for t in tasks for c in t.cells], tasks
    )
    statuses = {
        tasks[0].cells[0].run_dir: ("new", None),
        tasks[1].cells[0].run_dir: ("in-flight", {"job_id": "41_2"}),
        tasks[2].cells[0].run_dir: ("done", None),
    }
    assert dependency_ids(plan, tasks[3], {0: "50_0"}, statuses) == ["41_2", "50_0"]
