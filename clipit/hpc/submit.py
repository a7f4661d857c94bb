"""Run a grid (clipit/hpc/grid.py) as submitit job arrays: plan, pre-flight, submit in chunks, run tasks.

    clipit grid --config configs/grids/demo.yaml [--profile local] [--dry-run | --local]
    python launchers/grid.py ...   (the same command)

The launcher process only plans and submits. Each array task runs `clipit.hpc.task.run_task` on a
compute node (see clipit/hpc/task.py): the cells of its chain in order, each exactly
`clipit train --config CFG --set ... --method M --seed S` in a process of its own, resumable after a
requeue. The CLI hands it a typed `GridRequest` (clipit/hpc/requests.py).
"""

from __future__ import annotations

import datetime as _dt
import os
import time
from pathlib import Path

from clipit.config import ConfigError
from clipit.errors import ClipitError
from clipit.hpc import executor as executor_module
from clipit.hpc import ledger
from clipit.hpc.cluster import ClusterProfile, load_profile
from clipit.hpc.executor import (
    array_chunk_size,
    cluster_max_array_size,
    job_error_line,
    make_executor,
    wait_for_jobs,
)
from clipit.hpc.grid import Plan, expand
from clipit.hpc.grid_cell import cell_changes, cell_is_done
from clipit.hpc.grid_tasks import Task, chunk
from clipit.hpc.preflight import Hints, load_distinct, refuse_on_problems, run_checks
from clipit.hpc.requests import GridRequest
from clipit.hpc.status import progress_line
from clipit.hpc.task import CellRunner

# ---------------------------------------------------------------------------------------------
# Submitting


class SubmissionError(ClipitError):
    """sbatch refused a submission (the message is its stderr)."""

    exit_code = 1  # the grid is fine; the scheduler said no (partition, account, controller down)


def cell_statuses(plan: Plan, alive=None) -> dict[str, tuple[str, dict | None]]:
    """Each cell's ledger status; a finished cell made under another config than the grid's is *changed*
    (its state carries `changes`, the differing keys), never done."""
    alive = alive or ledger.JobChecker()
    statuses = {}
    for c in plan.cells:
        status, state = ledger.classify(c.run_dir, cell_is_done(c), alive)
        if status == "done" and (changes := cell_changes(c)):
            status, state = "changed", (state or {}) | {"changes": changes}
        statuses[c.run_dir] = (status, state)
    return statuses


def tasks_to_submit(plan: Plan, statuses: dict, force_unknown: bool = False) -> tuple[list[Task], list[str]]:
    """Tasks with work left and no cell still in flight; plus notes on what is skipped and why."""
    todo, notes, skipped = [], [], set()
    for i, task in enumerate(plan.tasks):
        states = [statuses[c.run_dir][0] for c in task.cells]
        if all(s == "done" for s in states):
            continue
        changed = [c for c, s in zip(task.cells, states) if s == "changed"]
        if changed:  # its train would stop on the finished run: keep it, as the cell's own rerun does
            c = changed[0]
            notes.append(
                f"not submitted: {task.label} ({c.method} seed {c.seed} finished under another config: "
                f"{statuses[c.run_dir][1]['changes']}; to keep it, give the grid another --root; to replace it, "
                f"delete {c.run_dir})"
            )
            skipped.add(i)
            continue
        busy = [c for c, s in zip(task.cells, states) if s == "in-flight" or (s == "unknown" and not force_unknown)]
        if busy:
            status, st = statuses[busy[0].run_dir]
            st = st or {}
            if status == "in-flight":
                why = f"job {st.get('job_id')} still queued or running"
            elif st.get("unreadable"):
                why = f"state unknown: {st['unreadable']}; a task may still be running it (--force-unknown resubmits)"
            else:
                why = f"job {st.get('job_id')} state unknown: squeue did not answer (--force-unknown resubmits)"
            notes.append(f"not resubmitted: {task.label} ({why})")
            skipped.add(i)
            continue
        if any(d in skipped and statuses[plan.tasks[d].cells[0].run_dir][0] != "in-flight" for d in task.after):
            notes.append(f"not submitted: {task.label} (the task that trains its warm start was not submitted)")
            skipped.add(i)
            continue
        todo.append(task)
    return todo, notes


def dependency_ids(plan: Plan, task: Task, new_jobs: dict[int, str], statuses: dict) -> list[str]:
    """Job ids this task must wait for: its warm-start tasks submitted now, or still in flight."""
    ids = []
    for i in task.after:
        if i in new_jobs:
            ids.append(new_jobs[i])
            continue
        for cell in plan.tasks[i].cells:  # not resubmitted: finished, or queued/running from before
            status, state = statuses[cell.run_dir]
            if status == "in-flight" and state and state.get("job_id"):
                ids.append(str(state["job_id"]))
                break
    return sorted(set(ids))


def print_plan(plan: Plan, statuses: dict, todo: list[Task], out=print) -> None:
    submit = {id(t) for t in todo}
    out(f"grid {plan.grid.name}: {len(plan.cells)} cells in {len(plan.tasks)} tasks; root {plan.root}")
    out("cells: " + ledger.summarize(s for s, _ in statuses.values()))
    for i, task in enumerate(plan.tasks):
        mark = "submit" if id(task) in submit else "skip"
        after = f" (after task {', '.join(map(str, task.after))})" if task.after else ""
        out(f"task {i} [{mark}] {task.label}{after}")
        for cell in task.cells:
            status, state = statuses[cell.run_dir]
            job = f" job {state.get('job_id')}" if state and state.get("job_id") and status != "done" else ""
            if state and state.get("unreadable"):
                job += " (state.json unreadable)"
            if status == "changed":
                job += f" ({state['changes']})"
            link = f" (warm start from {cell.warm_start_link})" if cell.warm_start_link else ""
            out(f"  {cell.method:<12} seed {cell.seed}  {status:<9}{job}  {cell.detail:<32} {cell.run_dir}{link}")
    for note in plan.notes:
        out(f"note: {note}")


def submit(
    plan: Plan, todo: list[Task], profile: ClusterProfile, cluster: str, log_root: Path, statuses: dict, out=print
) -> list:
    """Submit `todo` as arrays of at most MaxArraySize tasks; record pending + job ids in the ledger.

    Tasks without pending warm starts go first; tasks that wait for one are then submitted as arrays
    grouped by the job ids they wait for, each with an afterok dependency on exactly those tasks."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    folder = log_root / f"{stamp}-{os.getpid()}"  # fresh: SLURM job ids repeat after a purge
    size = array_chunk_size(profile, cluster_max_array_size() if cluster == "slurm" else None)
    index = {id(t): i for i, t in enumerate(plan.tasks)}
    new_jobs: dict[int, str] = {}
    first = [t for t in todo if not t.after]
    groups: dict[tuple, list[Task]] = {(): first} if first else {}
    waiting = [t for t in todo if t.after]
    out(
        f"submitting {len(todo)} tasks ({sum(len(t.cells) for t in todo)} cells) to {cluster} in arrays of "
        f"<= {size}; logs in {folder}"
    )
    jobs = []
    runner = CellRunner(executor=cluster)
    for wave in (0, 1):
        if wave == 1:
            groups = {}
            for task in waiting:
                groups.setdefault(tuple(dependency_ids(plan, task, new_jobs, statuses)), []).append(task)
        for deps, tasks in groups.items():
            dependency = "afterok:" + ":".join(deps) if deps else None
            executor = make_executor(profile, folder, f"clipit-{plan.grid.name}", cluster, dependency)
            for part in chunk(tasks, size):
                for task in part:
                    for cell in task.cells:
                        if not cell_is_done(cell):
                            ledger.mark_submitting(cell.run_dir, cell.to_dict(), cluster, str(folder))
                try:
                    part_jobs = executor.map_array(runner, part)
                except Exception as err:  # sbatch refused (no controller, bad partition/account ...)
                    message = " ".join(str(err).split())[-500:]
                    for task in part:
                        for cell in task.cells:
                            if not cell_is_done(cell):
                                ledger.mark_failed(cell.run_dir, f"submission failed: {message}")
                    raise SubmissionError(f"submitting {len(part)} task(s) failed: {message}") from None
                for task, job in zip(part, part_jobs):
                    new_jobs[index[id(task)]] = str(job.job_id)
                    out(f"job {job.job_id}  {task.label}" + (f"  (after {', '.join(deps)})" if deps else ""))
                    for cell in task.cells:
                        if not cell_is_done(cell):
                            ledger.mark_submitted(cell.run_dir, str(job.job_id))
                        out(f"  {cell.method:<12} seed {cell.seed}  {cell.run_dir}")
                jobs += part_jobs
    return jobs


def run_local(plan: Plan, todo: list[Task], profile: ClusterProfile, log_root: Path, out=print) -> int:
    """`--local`: submitit's local executor, at most `array_parallelism` tasks at a time; waits.
    A task that waits for a warm start starts once that task succeeded (and is skipped if it failed)."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    folder = log_root / f"{stamp}-{os.getpid()}"
    executor = make_executor(profile, folder, f"clipit-{plan.grid.name}", "local")
    runner = CellRunner(executor="local")
    index = {id(t): i for i, t in enumerate(plan.tasks)}
    submitted = {index[id(t)] for t in todo}
    width = max(1, profile.array_parallelism)
    queue, running, finished, failures = list(todo), [], {}, 0
    out(f"running {len(todo)} tasks locally, {width} at a time; logs in {folder}")
    last = time.monotonic()
    while queue or running:
        if time.monotonic() - last >= executor_module.PROGRESS_EVERY_S:  # as `clipit grid --wait`
            out(f"[{time.strftime('%H:%M:%S')}] {progress_line(plan)}")
            last = time.monotonic()
        for task in list(queue):
            if len(running) >= width:
                break
            deps = [d for d in task.after if d in submitted]
            if any(finished.get(d) is False for d in deps):
                queue.remove(task)
                failures += 1
                out(f"SKIPPED {task.label}: the task that trains its warm start failed")
                continue
            if not all(finished.get(d) for d in deps):
                continue
            queue.remove(task)
            for cell in task.cells:
                if not cell_is_done(cell):
                    ledger.mark_submitting(cell.run_dir, cell.to_dict(), "local", str(folder))
            job = executor.submit(runner, task)
            for cell in task.cells:
                if not cell_is_done(cell):
                    ledger.mark_submitted(cell.run_dir, str(job.job_id))
            out(f"job {job.job_id}  {task.label}")
            for cell in task.cells:
                out(f"  {cell.method:<12} seed {cell.seed}  {cell.run_dir}")
            running.append((job, task))
        time.sleep(0.5)
        for job, task in list(running):
            if job.done():
                running.remove((job, task))
                try:
                    job.results()
                    finished[index[id(task)]] = True
                    out(f"finished {task.label}")
                except Exception as err:
                    finished[index[id(task)]] = False
                    failures += 1
                    out(f"FAILED {task.label}: {job_error_line(job, err)} (log: {job.paths.stdout})")
    return failures


def print_cost(plan: Plan, profile: ClusterProfile, throughput_file=None, out=print) -> None:
    """The grid's samples per stage and GPU-hours, with and without the feature cache (clipit/hpc/cost.py)."""
    from clipit.hpc.cost import cost_lines, grid_cost
    from clipit.hpc.throughput import load_throughput

    world = max(1, profile.nodes * profile.tasks_per_node)
    throughput = load_throughput(throughput_file, profile.cpus_per_task)  # a bad --throughput file: the error
    try:
        stages = grid_cost(plan, world)
    except ConfigError as err:  # e.g. split sizes not known yet: the plan above still stands
        out(f"cost: not estimated ({err})")
        return
    for line in cost_lines(stages, throughput):
        out(line)


def run_grid(request: GridRequest, jobs_out: list | None = None) -> int:
    """`clipit grid` (and `python launchers/grid.py`): plan, pre-flight, then print, run locally or submit.
    The submitted jobs are appended to `jobs_out` (`clipit reproduce`'s report job waits for them)."""
    plan = expand(request.grid, list(request.overrides), root=request.root)
    profile_name = request.profile or plan.grid.profile
    profile = load_profile(profile_name, plan.grid.resources)
    cluster = "local" if request.local else profile.executor
    statuses = cell_statuses(plan)
    todo, notes = tasks_to_submit(plan, statuses, request.force_unknown)
    if request.dry_run:
        print_plan(plan, statuses, todo)
        print(
            f"profile {profile_name}: executor {cluster}, partition {profile.partition}, "
            f"account {profile.account}, {profile.nodes} node(s) x {profile.tasks_per_node} task(s), "
            f"{profile.gpus_per_node} GPU(s)/node, {profile.cpus_per_task} CPUs/task, {profile.mem_gb:g} GB, "
            f"{profile.timeout_min} min, parallelism {profile.array_parallelism}"
        )
        for line in notes:
            print(line)
        print(f"would submit {len(todo)} tasks ({sum(len(t.cells) for t in todo)} cells)")
        print_cost(plan, profile, request.throughput)
        check_before_submitting(request, todo)
        return 0
    for line in notes:
        print(line)
    check_before_submitting(request, todo)
    if not todo:
        print(f"nothing to submit: cells {ledger.summarize(s for s, _ in statuses.values())}")
        return 0
    log_root = Path(plan.root) / "submitit"
    if cluster == "local":
        failures = run_local(plan, todo, profile, log_root)
        print(f"local run finished: {len(todo) - failures} tasks ok, {failures} failed")
        return 1 if failures else 0
    jobs = submit(plan, todo, profile, cluster, log_root, statuses)
    if jobs_out is not None:
        jobs_out.extend(jobs)
    if request.wait:
        return 1 if wait_for_jobs(jobs, progress=lambda: progress_line(plan)) else 0
    hints = Hints(request.grid, request.root, request.overrides)
    print(f"follow: `{hints.command('grid', 'status')}`; stop: `{hints.command('grid', 'cancel')}`")
    return 0


def check_before_submitting(request: GridRequest, todo: list[Task]) -> None:
    """`clipit doctor`'s training checks over the distinct configs of the cells about to be submitted
    (clipit/hpc/preflight.py); refuses (exit 2) on a ✗ unless --no-preflight."""
    cells = [c for t in todo for c in t.cells if not cell_is_done(c)]
    if not request.preflight or not cells:
        return
    print(f"pre-flight (clipit doctor) of {len(cells)} cell(s) to submit:")
    configs = load_distinct((c.config, c.overrides) for c in cells)
    hints = Hints(request.grid, request.root, request.overrides)
    refuse_on_problems(run_checks(configs, "train", hints, echo=lambda line: print("  " + line)), "submitting")
