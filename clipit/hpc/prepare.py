"""Pairing and shard building as SLURM (submitit) jobs: launchers/pair.py and launchers/shards.py.

    clipit prepare pair   --grid configs/grids/paper_table1.yaml            # one job per pairing dir
    clipit prepare shards --grid configs/grids/paper_table1.yaml --pair     # pairing, then shard parts
    clipit prepare shards --config configs/demo-tiny.yaml --num-parts 4 --local
    (python launchers/pair.py and python launchers/shards.py are the same commands)

The work units come from a grid (every distinct pairing / shard directory its cells read; all
backbones of a dataset share them) or from one experiment config (`--config` + `--set`). Each unit
runs the stage of the matching command in the job's process:

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
from dataclasses import dataclass, field
from pathlib import Path

import submitit
import yaml

from clipit.config import ConfigError, load_config, to_dict
from clipit.hpc.cluster import ClusterProfile, load_profile
from clipit.hpc.executor import array_chunk_size, cluster_max_array_size, make_executor, wait_for_jobs
from clipit.hpc.grid import chunk, expand, load_grid


@dataclass
class Unit:
    """One config (file + overrides) standing for every cell that reads the same pairing/shard dir."""

    config: str
    overrides: list[str]
    dir: str  # the pairing or shard directory
    pairing_dir: str
    label: str
    extra: list[str] = field(default_factory=list)  # CLI args after the config (--part ...)

    def argv(self, command: str) -> list[str]:
        args = [*command.split(), "--config", self.config]
        for item in self.overrides:
            args += ["--set", item]
        return args + self.extra


class StageCall(submitit.helpers.Checkpointable):
    """Runs the stage of `clipit pair` / `clipit shard build` named by an argv in the job's process;
    requeued as is on timeout (the stages resume: finished shards are skipped)."""

    def __init__(self, workdir: str):
        self.workdir = workdir

    def __call__(self, argv: list[str]) -> str:
        from clipit.pipeline import pair_stage, shard_stage

        os.chdir(self.workdir)
        print("[clipit prepare] clipit " + shlex.join(argv), flush=True)
        stage, config, overrides, options = parse_stage_argv(argv)
        cfg = load_config(config, overrides)
        if stage == "pair":
            pair_stage(cfg)
        else:
            shard_stage(
                cfg,
                part=options.get("part"),
                num_parts=options.get("num_parts"),
                finalize=bool(options.get("finalize")),
            )
        return "ok"


def parse_stage_argv(argv: list[str]) -> tuple[str, str, list[str], dict]:
    """(stage, config, overrides, options) of an argv made by `Unit.argv` (the inverse of it)."""
    stage = "pair" if argv[0] == "pair" else "shard"
    rest = argv[1:] if stage == "pair" else argv[2:]
    config, overrides, options, i = "", [], {}, 0
    while i < len(rest):
        flag = rest[i]
        if flag == "--finalize":
            options["finalize"], i = True, i + 1
            continue
        value = rest[i + 1]
        if flag == "--config":
            config = value
        elif flag == "--set":
            overrides.append(value)
        else:
            options[flag.lstrip("-").replace("-", "_")] = int(value)
        i += 2
    return stage, config, overrides, options


def units_from(args) -> tuple[list[Unit], list[Unit]]:
    """(pairing units, shard units), deduplicated by directory; differing settings for one dir are an error."""
    if args.grid:
        plan = expand(args.grid, args.set)
        sources = [(c.config, list(c.overrides), c.key) for c in plan.cells]
    else:
        sources = [(str(Path(args.config).absolute()), list(args.set), Path(args.config).name)]
    pairing: dict[str, tuple[Unit, dict]] = {}
    shards: dict[str, tuple[Unit, dict]] = {}
    for config, overrides, label in sources:
        cfg = load_config(config, overrides)
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
            table[directory] = (Unit(config, overrides, directory, pdir, label), key)
    return [u for u, _ in pairing.values()], [u for u, _ in shards.values()]


def _folder(root: Path) -> Path:
    return root / f"{_dt.datetime.now().strftime('%Y%m%d-%H%M%S-%f')}-{os.getpid()}"


def _print_units(title: str, units: list[Unit], out=print) -> None:
    out(f"{title}: {len(units)}")
    for u in units:
        out(f"  {u.dir}  (config {u.config}{' + ' + str(len(u.overrides)) + ' overrides' if u.overrides else ''})")


def run_jobs(
    profile: ClusterProfile,
    cluster: str,
    folder: Path,
    name: str,
    argvs: list[list[str]],
    labels: list[str],
    dependency: str | None = None,
    out=print,
) -> list:
    """Submit stage calls (`clipit pair|shard build` argvs) as arrays (chunked under MaxArraySize); returns the jobs."""
    executor = make_executor(profile, folder, name, cluster, dependency)
    size = array_chunk_size(profile, cluster_max_array_size() if cluster == "slurm" else None)
    call = StageCall(os.getcwd())
    jobs = []
    for part_argvs, part_labels in zip(chunk(argvs, size), chunk(labels, size)):
        part_jobs = (
            executor.map_array(call, part_argvs)
            if cluster == "slurm"
            else [executor.submit(call, a) for a in part_argvs]
        )
        for job, label in zip(part_jobs, part_labels):
            out(f"job {job.job_id}  {label}" + (f"  (after {dependency.split(':', 1)[1]})" if dependency else ""))
        jobs += part_jobs
    return jobs


def _profile(args, default_gpus: int | None = None) -> tuple[ClusterProfile, str]:
    name = args.profile
    if name is None:
        name = load_grid_profile(args.grid) if args.grid else "local-cluster"
    resources = {}
    if default_gpus is not None:
        resources["gpus_per_node"] = default_gpus
    for item in args.resources:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--resources {item!r}: write KEY=VALUE")
        resources[key] = yaml.safe_load(value)
    profile = load_profile(name, resources)
    return profile, ("local" if args.local else profile.executor)


def load_grid_profile(grid_path: str) -> str:
    return load_grid(grid_path).profile


def prepare_pair(args) -> int:
    """`clipit prepare pair` (and `python launchers/pair.py`)."""
    pairing, _ = units_from(args)
    profile, cluster = _profile(args)
    if args.dry_run:
        _print_units("pairing dirs", pairing)
        for u in pairing:
            print("  " + shlex.join(["clipit", *u.argv("pair")]))
        return 0
    folder = _folder(Path(pairing[0].dir).parent / "submitit-pair")
    print(f"submitting {len(pairing)} pairing task(s) to {cluster}; logs in {folder}")
    jobs = run_jobs(
        profile, cluster, folder, "clipit-pair", [u.argv("pair") for u in pairing], [u.dir for u in pairing]
    )
    return 1 if (args.local or args.wait) and wait_for_jobs(jobs) else 0


def prepare_shards(args) -> int:
    """`clipit prepare shards` (and `python launchers/shards.py`)."""
    if args.num_parts < 1:
        raise ConfigError(f"--num-parts {args.num_parts}: give at least 1 part per shard directory")
    pairing, shard_units = units_from(args)
    profile, cluster = _profile(args, default_gpus=0)
    pair_profile = None
    if args.pair:
        saved, args.resources = args.resources, args.pair_resources
        pair_profile, _ = _profile(args)
        args.resources = saved
    n = args.num_parts
    if args.dry_run:
        if args.pair:
            _print_units("pairing dirs", pairing)
        _print_units(f"shard dirs ({n} parts each, then --finalize)", shard_units)
        for u in shard_units:
            print("  " + shlex.join(["clipit", *u.argv("shard build")]) + f" --part $I --num-parts {n}")
        return 0
    folder = _folder(Path(shard_units[0].dir).parent / "submitit-shards")
    print(f"logs in {folder}")
    jobs_all, pair_job = [], {}
    if args.pair:
        print(f"pairing: {len(pairing)} task(s)")
        pair_jobs = run_jobs(
            pair_profile, cluster, folder, "clipit-pair", [u.argv("pair") for u in pairing], [u.dir for u in pairing]
        )
        if cluster != "slurm" and wait_for_jobs(pair_jobs):  # local: run the stages in order
            return 1
        pair_job = {u.dir: j.job_id for u, j in zip(pairing, pair_jobs)}
        jobs_all += pair_jobs
    for unit in shard_units:
        dep = pair_job.get(unit.pairing_dir) if cluster == "slurm" else None
        print(f"shards {unit.dir}: {n} part(s)")
        argvs = [unit.argv("shard build") + ["--part", str(i), "--num-parts", str(n)] for i in range(n)]
        parts = run_jobs(
            profile,
            cluster,
            folder,
            "clipit-shards",
            argvs,
            [f"part {i}/{n}" for i in range(n)],
            dependency=f"afterok:{dep}" if dep else None,
        )
        if cluster != "slurm":
            if wait_for_jobs(parts):
                return 1
            final_dep = None
        else:
            final_dep = "afterok:" + ":".join(str(j.job_id) for j in parts)
        jobs_all += parts
        jobs_all += run_jobs(
            profile,
            cluster,
            folder,
            "clipit-shards",
            [unit.argv("shard build") + ["--finalize"]],
            ["finalize (manifest)"],
            dependency=final_dep,
        )
    return 1 if (args.local or args.wait) and wait_for_jobs(jobs_all) else 0
