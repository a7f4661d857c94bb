"""Pairing and shard building as SLURM (submitit) jobs: launchers/pair.py and launchers/shards.py.

    clipit prepare pair   --grid configs/grids/paper_table1.yaml            # one job per pairing dir
    clipit prepare shards --grid configs/grids/paper_table1.yaml --pair     # pairing, then shard parts
    clipit prepare shards --config configs/demo-tiny.yaml --num-parts 4 --local
    (python launchers/pair.py and python launchers/shards.py are the same commands)

The work units come from a grid (every distinct pairing / shard directory its cells read; all
backbones of a dataset share them) or from one experiment config (`--config` + `--set`). Each job
runs the matching command in a process of its own (clipit/cells.py), built from a `StageJob`:

    pairing:   clipit pair  --config CFG --set ...                          (one array task per pairing dir)
    parts:     clipit shard build --config CFG --set ... --part I --num-parts N   (one array per shard dir)
    finalize:  clipit shard build --config CFG --set ... --finalize               (afterok on that array)

Parts skip shards that exist, and the last part to finish writes the manifest, so a rerun (or a
requeue after a timeout: the jobs are Checkpointable) only does the missing work. With `--pair`
the parts of a shard set wait (afterok) for the pairing task of their pairing dir.
"""

from __future__ import annotations

import datetime as _dt
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import submitit

from clipit.cells import ERROR_PREFIX, CellsFailed, ConfigSource, run_cell
from clipit.config import ConfigError, load_config, to_dict
from clipit.hpc.cluster import ClusterProfile, load_profile
from clipit.hpc.executor import array_chunk_size, cluster_max_array_size, make_executor, wait_for_jobs
from clipit.hpc.grid import expand
from clipit.hpc.grid_file import load_grid
from clipit.hpc.grid_tasks import chunk
from clipit.hpc.preflight import Hints, load_distinct, refuse_on_problems, run_checks
from clipit.hpc.requests import PrepareRequest


@dataclass(frozen=True)
class StageJob:
    """One submitted stage call: `clipit pair` or `clipit shard build` (a part, or the manifest)."""

    stage: Literal["pair", "shards"]
    source: ConfigSource
    part: int | None = None
    num_parts: int | None = None
    finalize: bool = False

    def argv(self) -> list[str]:
        """The clipit command the job runs (and the dry run prints); the one place it is spelled."""
        parts = ["--part", str(self.part), "--num-parts", str(self.num_parts)] if self.part is not None else []
        command = ["pair"] if self.stage == "pair" else ["shard", "build"]
        return [*command, *self.source.args(), *parts, *(["--finalize"] if self.finalize else [])]


@dataclass
class Unit:
    """One config (file + overrides) standing for every cell that reads the same pairing/shard dir."""

    source: ConfigSource
    dir: str  # the pairing or shard directory
    pairing_dir: str
    label: str

    def job(self, stage: Literal["pair", "shards"], **options) -> StageJob:
        return StageJob(stage, self.source, **options)


class StageCall(submitit.helpers.Checkpointable):
    """Runs a stage job's clipit command in a process of its own (clipit/cells.py) and waits; requeued
    as is on timeout (the stages resume: finished shards are skipped)."""

    def __init__(self, workdir: str):
        self.workdir = workdir

    def __call__(self, job: StageJob) -> str:
        os.chdir(self.workdir)
        argv = job.argv()
        print("[clipit prepare] clipit " + shlex.join(argv), flush=True)
        failure = run_cell(argv)
        if failure is not None:
            print(f"{ERROR_PREFIX} {failure}", file=sys.stderr, flush=True)  # what the launcher quotes
            raise CellsFailed(f"clipit {shlex.join(argv)}: {failure}")
        return "ok"


def units_from(request: PrepareRequest) -> tuple[list[Unit], list[Unit]]:
    """(pairing units, shard units), deduplicated by directory; differing settings for one dir are an error."""
    if request.grid:
        plan = expand(request.grid, list(request.overrides), root=request.root)
        sources = [(ConfigSource(c.config, tuple(c.overrides)), c.key) for c in plan.cells]
    else:
        config = str(Path(request.config).absolute())
        sources = [(ConfigSource(config, tuple(request.overrides)), Path(request.config).name)]
    pairing: dict[str, tuple[Unit, dict]] = {}
    shards: dict[str, tuple[Unit, dict]] = {}
    # cells that differ only by method or seed share one config: load each distinct one once
    distinct: dict[ConfigSource, str] = {}
    for source, label in sources:
        distinct.setdefault(source, label)
    for source, label in distinct.items():
        cfg = load_config(source.path, list(source.overrides))
        d = to_dict(cfg)
        pdir, sdir = str(Path(cfg.pairing.dir).absolute()), str(Path(cfg.shards.dir).absolute())
        pkey = {k: d[k] for k in ("data", "reports", "pairing")}
        skey = pkey | {"shards": d["shards"]}
        for table, key, directory in ((pairing, pkey, pdir), (shards, skey, sdir)):
            if directory in table:
                if table[directory][1] != key:
                    raise ConfigError(
                        f"{directory}: cells {table[directory][0].label} and {label} use this directory "
                        "with different data/reports/pairing/shards settings; give them separate dirs"
                    )
                continue
            table[directory] = (Unit(source, directory, pdir, label), key)
    return [u for u, _ in pairing.values()], [u for u, _ in shards.values()]


def _folder(root: Path) -> Path:
    return root / f"{_dt.datetime.now().strftime('%Y%m%d-%H%M%S-%f')}-{os.getpid()}"


def _print_units(title: str, units: list[Unit], out=print) -> None:
    out(f"{title}: {len(units)}")
    for u in units:
        n = len(u.source.overrides)
        out(f"  {u.dir}  (config {u.source.path}{' + ' + str(n) + ' overrides' if n else ''})")


def run_jobs(
    profile: ClusterProfile,
    cluster: str,
    folder: Path,
    name: str,
    jobs: list[StageJob],
    labels: list[str],
    dependency: str | None = None,
    out=print,
    call: StageCall | None = None,
) -> list:
    """Submit stage jobs as arrays (chunked under MaxArraySize); returns the submitit jobs. `call` runs
    each job (default: a StageCall in this working directory)."""
    executor = make_executor(profile, folder, name, cluster, dependency)
    size = array_chunk_size(profile, cluster_max_array_size() if cluster == "slurm" else None)
    call = call or StageCall(os.getcwd())
    submitted = []
    for part_jobs, part_labels in zip(chunk(jobs, size), chunk(labels, size)):
        handles = (
            executor.map_array(call, part_jobs)
            if cluster == "slurm"
            else [executor.submit(call, job) for job in part_jobs]
        )
        for handle, label in zip(handles, part_labels):
            out(f"job {handle.job_id}  {label}" + (f"  (after {dependency.split(':', 1)[1]})" if dependency else ""))
        submitted += handles
    return submitted


def _profile(request: PrepareRequest, resources: dict, default_gpus: int | None = None) -> tuple[ClusterProfile, str]:
    name = request.profile
    if name is None:
        name = load_grid(request.grid).profile if request.grid else "local-cluster"
    fields = ({"gpus_per_node": default_gpus} if default_gpus is not None else {}) | resources
    profile = load_profile(name, fields)
    return profile, ("local" if request.local else profile.executor)


def check_units(request: PrepareRequest, units: list[Unit]) -> None:
    """`clipit doctor`'s input checks (data, corpus, weights file, pairing model) over the configs of the
    jobs about to be submitted (clipit/hpc/preflight.py); refuses (exit 2) on a ✗, dry run included."""
    if not request.preflight:
        return
    print(f"pre-flight (clipit doctor) of {len(units)} config(s):")
    configs = load_distinct((u.source.path, u.source.overrides) for u in units)
    hints = Hints(request.grid, request.root, request.overrides)
    checks = run_checks(configs, request.stage, hints, echo=lambda line: print("  " + line))
    refuse_on_problems(checks, "the jobs are submitted")


def next_step(request: PrepareRequest) -> None:
    if request.grid:
        print(f"then: `{Hints(request.grid, request.root, request.overrides).command('grid')}`")


def prepare_pair(request: PrepareRequest) -> int:
    """`clipit prepare pair` (and `python launchers/pair.py`)."""
    pairing, _ = units_from(request)
    profile, cluster = _profile(request, request.resources)
    jobs = [u.job("pair") for u in pairing]
    if request.dry_run:
        _print_units("pairing dirs", pairing)
        for job in jobs:
            print("  " + shlex.join(["clipit", *job.argv()]))
    check_units(request, pairing)
    if request.dry_run:
        return 0
    folder = _folder(Path(pairing[0].dir).parent / "submitit-pair")
    print(f"submitting {len(pairing)} pairing task(s) to {cluster}; logs in {folder}")
    handles = run_jobs(profile, cluster, folder, "clipit-pair", jobs, [u.dir for u in pairing])
    status = 1 if (request.local or request.wait) and wait_for_jobs(handles) else 0
    next_step(request)
    return status


def prepare_shards(request: PrepareRequest) -> int:
    """`clipit prepare shards` (and `python launchers/shards.py`)."""
    n = request.num_parts
    if n < 1:
        raise ConfigError(f"--num-parts {n}: give at least 1 part per shard directory")
    pairing, shard_units = units_from(request)
    profile, cluster = _profile(request, request.resources, default_gpus=0)
    pair_profile = _profile(request, request.pair_resources)[0] if request.pair else None
    if request.dry_run:
        if request.pair:
            _print_units("pairing dirs", pairing)
        _print_units(f"shard dirs ({n} parts each, then --finalize)", shard_units)
        for u in shard_units:
            print("  " + shlex.join(["clipit", *u.job("shards").argv()]) + f" --part $I --num-parts {n}")
    check_units(request, shard_units)
    if request.dry_run:
        return 0
    failed, jobs_all = launch_shards(
        pairing if request.pair else [], shard_units, n, profile, pair_profile, cluster, request.local or request.wait
    )
    next_step(request)
    return 1 if failed else 0


def launch_shards(
    pairing: list[Unit],
    shard_units: list[Unit],
    n: int,
    profile: ClusterProfile,
    pair_profile: ClusterProfile | None,
    cluster: str,
    wait: bool,
) -> tuple[bool, list]:
    """Submit the pairing tasks (when `pairing` is given), then each shard dir's parts and its --finalize
    job; under SLURM with afterok dependencies, elsewhere (local) stage by stage, waiting. Returns (a job
    failed, the submitted jobs). Also the prepare stage of `clipit reproduce` (clipit/hpc/reproduce.py)."""
    folder = _folder(Path(shard_units[0].dir).parent / "submitit-shards")
    print(f"logs in {folder}")
    jobs_all, pair_job = [], {}
    if pairing:
        print(f"pairing: {len(pairing)} task(s)")
        pair_jobs = run_jobs(
            pair_profile, cluster, folder, "clipit-pair", [u.job("pair") for u in pairing], [u.dir for u in pairing]
        )
        if cluster != "slurm" and wait_for_jobs(pair_jobs):  # local: run the stages in order
            return True, pair_jobs
        pair_job = {u.dir: j.job_id for u, j in zip(pairing, pair_jobs)}
        jobs_all += pair_jobs
    for unit in shard_units:
        dep = pair_job.get(unit.pairing_dir) if cluster == "slurm" else None
        print(f"shards {unit.dir}: {n} part(s)")
        parts = run_jobs(
            profile,
            cluster,
            folder,
            "clipit-shards",
            [unit.job("shards", part=i, num_parts=n) for i in range(n)],
            [f"part {i}/{n}" for i in range(n)],
            dependency=f"afterok:{dep}" if dep else None,
        )
        if cluster != "slurm":
            if wait_for_jobs(parts):
                return True, jobs_all + parts
            final_dep = None
        else:
            final_dep = "afterok:" + ":".join(str(j.job_id) for j in parts)
        jobs_all += parts
        jobs_all += run_jobs(
            profile,
            cluster,
            folder,
            "clipit-shards",
            [unit.job("shards", finalize=True)],
            ["finalize (manifest)"],
            dependency=final_dep,
        )
    return bool(wait and wait_for_jobs(jobs_all)), jobs_all
