"""`clipit reproduce --grid GRID [--grid GRID ...]` (and `python launchers/reproduce.py`): the whole chain from
inputs to report, as one command over the stage commands:

    1 doctor    `clipit doctor`'s checks of every distinct cell config (not the shards: stage 2 builds
                them), here, before anything is queued; a ✗ refuses (exit 2), --dry-run included
    2 prepare   `clipit prepare shards --pair` over the pairing and shard dirs of every grid that are not
                built yet (clipit/hpc/prepare.py)
    3 grids     `clipit grid` of each grid file (clipit/hpc/submit.py)
    4 frozen    `clipit evaluate --frozen` (k-NN, few-shot) of each Table 1 probe and CLIP-IT cell
                (clipit/hpc/frozen_stage.py): the report's frozen-feature table
    5 report    `clipit report ROOT` of each distinct grid root

Under SLURM, stage 2's arrays are queued now; stage 3 is one small CPU job, afterok on all of stage 2,
that runs `clipit reproduce ... --stage grids` on a compute node. It submits the grids only then, because
the grid launcher decides each cell's work from what is on disk and its pre-flight reads the shard
manifests, which do not exist before stage 2 ends. That job then queues stage 4 (one job per cell, on the
grid's resources with one GPU) with afterany on every grid job, and stage 5 with afterany on those: the
report is written when the last cell ends, failed cells included (the report names them; their frozen
jobs skip them), where afterok would drop the report of a grid with one failed cell. `--local` runs the
stages in order here through submitit's local executor, waiting for each. Every stage skips finished
work (built shard dirs, done cells, frozen evaluations of the current training), so rerunning resumes;
under SLURM a rerun first checks that the chain it queued before (layout.reproduce_chain_file) has left
the queue.
"""

from __future__ import annotations

import datetime as _dt
import os
import shlex
from dataclasses import dataclass, replace
from pathlib import Path

from clipit import layout
from clipit.config import ConfigError
from clipit.errors import ClipitError
from clipit.hpc.cluster import load_profile
from clipit.hpc.frozen_stage import FrozenJob, frozen_cells, submit_frozen
from clipit.hpc.grid import Plan, expand
from clipit.hpc.ledger import live_slurm_jobs
from clipit.hpc.preflight import Hints, load_distinct, refuse_on_problems, run_checks
from clipit.hpc.prepare import Unit, launch_shards, run_jobs, units_from
from clipit.hpc.requests import GridRequest, PrepareRequest, ReproduceRequest
from clipit.hpc.submit import run_grid
from clipit.io import atomic_write_json, read_json_object
from clipit.shards.manifest import MANIFEST

# the stage 3 and stage 4 jobs: one process on a CPU (stage 3 only submits; the report reads files)
STAGE_JOB = {"nodes": 1, "tasks_per_node": 1, "gpus_per_node": 0, "cpus_per_task": 1, "mem_gb": 4, "timeout_min": 60}
REPORT_JOB = STAGE_JOB | {"cpus_per_task": 4, "mem_gb": 16, "timeout_min": 120}
SHOWN = 4  # stage 4 commands the dry run spells out (one per cell: 108 on the paper grid)


@dataclass(frozen=True)
class Command:
    """A clipit command as a job (prepare.StageCall runs anything with an argv())."""

    args: tuple[str, ...]

    def argv(self) -> list[str]:
        return list(self.args)


@dataclass
class Chain:
    plans: list[Plan]
    pairing: list[Unit]  # pairing dirs whose shard dirs are not all built
    shards: list[Unit]  # shard dirs without a manifest
    built: int  # shard dirs with one (skipped)
    roots: list[str]


def plan_chain(request: ReproduceRequest) -> Chain:
    """Every grid's plan and the pairing/shard dirs left to build (deduplicated across the grids)."""
    plans = [expand(g, list(request.overrides), root=request.root) for g in request.grids]
    pairing: dict[str, Unit] = {}
    shards: dict[str, Unit] = {}
    for grid in request.grids:
        p, s = units_from(PrepareRequest(stage="shards", grid=grid, overrides=request.overrides, root=request.root))
        for unit in p:
            pairing.setdefault(unit.dir, unit)
        for unit in s:
            shards.setdefault(unit.dir, unit)
    todo = [u for u in shards.values() if not (Path(u.dir) / MANIFEST).is_file()]
    pair = [u for u in pairing.values() if any(t.pairing_dir == u.dir for t in todo)]
    roots = list(dict.fromkeys(str(p.root) for p in plans))
    return Chain(plans, pair, todo, len(shards) - len(todo), roots)


def grid_args(request: ReproduceRequest, grid: str) -> list[str]:
    return ["--config", grid, *(["--root", request.root] if request.root else [])] + [
        a for item in request.overrides for a in ("--set", item)
    ]


def stage_argv(request: ReproduceRequest, profile: str) -> list[str]:
    """The stage 3 job's command: this chain from its grids stage on."""
    argv = ["reproduce", *(a for g in request.grids for a in ("--grid", g)), "--stage", "grids", "--profile", profile]
    argv += ["--root", request.root] if request.root else []
    argv += [a for item in request.overrides for a in ("--set", item)]
    return argv + ([] if request.preflight else ["--no-preflight"]) + ([] if request.frozen else ["--no-frozen"])


def doctor(request: ReproduceRequest, chain: Chain) -> None:
    """Stage 1: the doctor's checks of every distinct cell config; raises the refusal on a ✗."""
    if not request.preflight:
        print("stage 1 doctor: skipped (--no-preflight)")
        return
    configs = load_distinct((c.config, c.overrides) for plan in chain.plans for c in plan.cells)
    stage = "chain" if chain.shards else "all"  # shards not built yet: stage 2 builds them
    print(f"stage 1 doctor: {len(configs)} distinct config(s)" + (", shards left to stage 2" if chain.shards else ""))
    hints = Hints(request.grids[0], request.root, request.overrides)
    refuse_on_problems(run_checks(configs, stage, hints, echo=lambda line: print("  " + line)), "the chain starts")


def print_chain(request: ReproduceRequest, chain: Chain, cluster: str, profile_name: str) -> None:
    n = request.num_parts
    print(
        f"reproduce: {len(chain.plans)} grid(s), {sum(len(p.cells) for p in chain.plans)} cells; executor {cluster} "
        f"(profile {profile_name}); each stage skips finished work, so rerunning resumes"
    )
    print("stage 1 doctor: the checks below, now")
    print(
        f"stage 2 prepare: {len(chain.pairing)} pairing task(s), {len(chain.shards)} shard dir(s) x {n} part(s) "
        f"+ {len(chain.shards)} finalize job(s); {chain.built} shard dir(s) built already"
    )
    for unit in chain.pairing:
        print("  " + shlex.join(["clipit", *unit.job("pair").argv()]))
    for unit in chain.shards:
        print("  " + shlex.join(["clipit", *unit.job("shards").argv()]) + f" --part $I --num-parts {n}")
    when = "after stage 2 succeeds (afterok), one CPU job submits" if cluster == "slurm" else "here, in order"
    print(f"stage 3 grids: {when}")
    for grid in request.grids:
        print("  " + shlex.join(["clipit", "grid", *grid_args(request, grid)]))
    if cluster == "slurm":
        print("  (the job runs: " + shlex.join(["clipit", *stage_argv(request, profile_name)]) + ")")
    cells = frozen_cells(chain.plans) if request.frozen else []
    when = "a job per cell after every grid job ends (afterany)" if cluster == "slurm" else "here, in order"
    if request.frozen:
        print(f"stage 4 frozen features: {len(cells)} Table 1 cell(s), unfinished ones skipped; {when}")
    else:
        print("stage 4 frozen features: skipped (--no-frozen)")
    for cell in cells[:SHOWN]:
        print("  " + shlex.join(["clipit", *FrozenJob(cell).argv()]))
    if len(cells) > SHOWN:
        print(f"  ... and {len(cells) - SHOWN} more: one per probe and CLIP-IT cell, each --method M --seed S --frozen")
    if cells:
        print_frozen_cost(cells, request, profile_name)
    when = "one job after every stage 4 job ends (afterany: failed cells are named)" if cluster == "slurm" else "here"
    print(f"stage 5 report: {when}")
    for root in chain.roots:
        print("  " + shlex.join(["clipit", "report", root]))
    for grid in request.grids:  # each grid's plan and cost, as `clipit grid --dry-run`
        print(f"\n--- stage 3: {grid} ---")
        dry = GridRequest(grid, request.overrides, request.root, request.profile, dry_run=True, preflight=False)
        run_grid(replace(dry, throughput=request.throughput))
    print()


def print_frozen_cost(cells: list, request: ReproduceRequest, profile_name: str) -> None:
    """Stage 4's images and GPU-hours (clipit/hpc/cost.py), at the throughput the grids' cost uses."""
    from clipit.hpc.cost import frozen_eval_stage
    from clipit.hpc.throughput import load_throughput

    throughput = load_throughput(request.throughput, load_profile(profile_name).cpus_per_task)
    try:
        stage = frozen_eval_stage(cells)
    except ConfigError as err:  # split sizes not known yet
        print(f"  cost: not estimated ({err})")
        return
    print(
        f"  cost: {stage.images(False):,} images through the backbones, {stage.gpu_hours(throughput, False):.2f} "
        f"GPU-h (throughput {throughput.source}; an upper bound: caches the grids built are counted again)"
    )


def _folder(root: str) -> Path:
    return Path(root) / "submitit" / f"{_dt.datetime.now().strftime('%Y%m%d-%H%M%S-%f')}-{os.getpid()}"


def chain_in_flight(roots: list[str]) -> list[str]:
    """Job ids of an earlier chain of these roots still queued or running (SLURM)."""
    recorded = []
    for root in roots:
        path = layout.reproduce_chain_file(root)
        if path.is_file():
            recorded += read_json_object(path, f"delete {path} if no chain of it is queued").get("jobs", [])
    if not recorded:
        return []
    alive = live_slurm_jobs()
    if alive is None:
        raise ClipitError(
            f"squeue did not answer: cannot tell whether the chain queued before (jobs {', '.join(recorded)}) is "
            f"still running; retry, or delete {layout.reproduce_chain_file(roots[0])} if it is not"
        )
    return [j for j in recorded if j in alive or any(a.startswith(j + "_") for a in alive)]


def run_reproduce(request: ReproduceRequest) -> int:
    """`clipit reproduce` (and `python launchers/reproduce.py`)."""
    chain = plan_chain(request)
    profile_name = request.profile or chain.plans[0].grid.profile
    profile = load_profile(profile_name, {"gpus_per_node": 0} | request.resources)
    cluster = "local" if request.local else profile.executor
    if request.stage == "grids":
        return grids_stage(request, chain, cluster, profile_name)
    if request.dry_run:
        print_chain(request, chain, cluster, profile_name)
        doctor(request, chain)
        return 0
    if cluster == "slurm" and (alive := chain_in_flight(chain.roots)):
        print(f"a chain queued before is still in flight (jobs {', '.join(alive)}); nothing submitted")
        return 0
    doctor(request, chain)
    prepare_jobs = []
    if chain.shards:
        print(f"stage 2 prepare: {len(chain.pairing)} pairing dir(s), {len(chain.shards)} shard dir(s)")
        pair_profile = load_profile(profile_name, request.pair_resources)
        failed, prepare_jobs = launch_shards(
            chain.pairing, chain.shards, request.num_parts, profile, pair_profile, cluster, cluster != "slurm"
        )
        if failed:
            print("stage 2 prepare failed: the grids are not started (rerun after fixing it: built dirs are kept)")
            return 1
    else:
        print(f"stage 2 prepare: all {chain.built} shard dir(s) built; skipped")
    if cluster != "slurm" or not prepare_jobs:
        return grids_stage(request, chain, cluster, profile_name)
    ids = sorted({str(j.job_id).split("_")[0] for j in prepare_jobs})
    stage_profile = load_profile(profile_name, STAGE_JOB)
    print("stage 3 grids: one job submits them once stage 2 succeeded")
    (stage_job,) = run_jobs(
        stage_profile,
        cluster,
        _folder(chain.roots[0]),
        "clipit-reproduce",
        [Command(tuple(stage_argv(request, profile_name)))],
        ["grids, then the report job"],
        dependency="afterok:" + ":".join(ids),
    )
    for root in chain.roots:
        atomic_write_json(layout.reproduce_chain_file(root), {"jobs": [*ids, str(stage_job.job_id)]})
    print(f"follow: `clipit grid status --config {request.grids[0]}` once job {stage_job.job_id} has run")
    return 0


def grids_stage(request: ReproduceRequest, chain: Chain, cluster: str, profile_name: str) -> int:
    """Stages 3 to 5: each grid (a refused or failed grid does not stop the others), the frozen-feature
    evaluations, then the report: here after a local run, else as jobs after every grid job (afterany)."""
    failures, jobs = 0, []
    for grid in request.grids:
        print(f"stage 3 grid {grid}")
        grid_request = GridRequest(
            grid, request.overrides, request.root, profile_name, local=cluster == "local", preflight=request.preflight
        )
        try:
            failures += bool(run_grid(grid_request, jobs_out=jobs))
        except ClipitError as err:
            print(f"stage 3 grid {grid} refused: {err}")
            failures += 1
    reports = [Command(("report", root)) for root in chain.roots]
    folder = _folder(chain.roots[0])
    if not request.frozen:
        print("stage 4 frozen features: skipped (--no-frozen)")
    elif cluster == "slurm":
        grid_ids = sorted({str(j.job_id).split("_")[0] for j in jobs})
        after = "afterany:" + ":".join(grid_ids) if grid_ids else None
        frozen_jobs, _ = submit_frozen(chain.plans, profile_name, cluster, folder, dependency=after)
        jobs += frozen_jobs
    else:
        _, failed = submit_frozen(chain.plans, profile_name, cluster, folder)
        if failed:
            print(f"stage 4 frozen features: {failed} evaluation(s) failed; the report leaves them out")
            failures += 1
    if cluster == "slurm" and jobs:
        ids = sorted({str(j.job_id).split("_")[0] for j in jobs})
        report_jobs = run_jobs(
            load_profile(profile_name, REPORT_JOB),
            cluster,
            folder,
            "clipit-report",
            reports,
            chain.roots,
            dependency="afterany:" + ":".join(ids),
        )
        print(f"stage 5 report: queued after {len(ids)} grid and frozen-feature job(s)")
        queued = [*ids, *(str(j.job_id) for j in report_jobs)]
        for root in chain.roots:
            atomic_write_json(layout.reproduce_chain_file(root), {"jobs": queued})
        return 1 if failures else 0
    from clipit.results.report import build_report  # imported here: matplotlib only when a report is written

    for root in chain.roots:
        result = build_report(root)
        print(f"stage 5 report: {result['runs']} run(s); wrote {result['files'][0]}")
    return 1 if failures else 0
