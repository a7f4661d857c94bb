"""The HPC commands of `clipit` (grid, grid status|cancel, prepare, reproduce): their flags and the typed
requests they hand to clipit/hpc/. clipit/cli.py adds them to its parser and runs them."""

from __future__ import annotations

from clipit.cli_flags import (
    ChoicesHelpParser,
    add_cluster_flags,
    add_config_flags,
    add_overwrite_flag,
    add_root_flag,
    config_of,
)


def cmd_grid(args) -> int:
    from clipit.config import ConfigError
    from clipit.hpc.requests import GridRequest
    from clipit.hpc.submit import run_grid

    if not args.config:
        raise ConfigError("give the grid file: clipit grid --config GRID (or clipit grid status|cancel --config GRID)")
    return run_grid(
        GridRequest(
            grid=args.config,
            overrides=tuple(args.set),
            root=args.root,
            profile=args.profile,
            dry_run=args.dry_run,
            local=args.local,
            wait=args.wait,
            force_unknown=args.force_unknown,
            preflight=not args.no_preflight,
            throughput=args.throughput,
        )
    )


def _grid_query(args):
    from clipit.hpc.requests import GridQuery

    return GridQuery(grid=args.config, overrides=tuple(args.set), root=args.root)


def cmd_grid_status(args) -> int:
    from clipit.hpc.status import grid_status_command

    return grid_status_command(_grid_query(args))


def cmd_grid_cancel(args) -> int:
    from clipit.hpc.status import grid_cancel_command

    return grid_cancel_command(_grid_query(args))


def resources(items: list[str], flag: str = "--resources") -> dict:
    """`--resources KEY=VALUE` items as profile fields (values read as YAML: 0, 8, true, a name)."""
    import yaml

    from clipit.config import ConfigError

    fields = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"{flag} {item!r}: write KEY=VALUE")
        fields[key] = yaml.safe_load(value)
    return fields


def prepare_request(args, stage: str):
    from clipit.hpc.requests import PrepareRequest

    shards = stage == "shards"
    return PrepareRequest(
        stage=stage,
        grid=args.grid,
        config=args.config,
        overrides=tuple(args.set),
        root=args.root,
        profile=args.profile,
        dry_run=args.dry_run,
        local=args.local,
        wait=args.wait,
        resources=resources(args.resources),
        num_parts=args.num_parts if shards else 1,
        pair=shards and args.pair,
        pair_resources=resources(args.pair_resources, "--pair-resources") if shards else {},
        preflight=not args.no_preflight,
    )


def cmd_prepare_demo(args) -> None:
    from clipit.demo_inputs import prepare_demo

    if not prepare_demo(config_of(args), overwrite=args.overwrite):
        print("the demo inputs are prepared already")


def cmd_prepare_pair(args) -> int:
    from clipit.hpc.prepare import prepare_pair

    return prepare_pair(prepare_request(args, "pair"))


def cmd_prepare_shards(args) -> int:
    from clipit.hpc.prepare import prepare_shards

    return prepare_shards(prepare_request(args, "shards"))


def cmd_prepare_reports(args) -> None:
    from clipit.corpus_join import join_reports

    done = join_reports(args.csv, args.project_map, args.out, overwrite=args.overwrite)
    counts = ", ".join(f"{p} {n}" for p, n in sorted(done["projects"].items()))
    print(f"wrote {done['out']}: {done['reports']} reports ({counts}; {done['unmapped']} without a project)")


def cmd_reproduce(args) -> int:
    from clipit.hpc.reproduce import run_reproduce
    from clipit.hpc.requests import ReproduceRequest

    return run_reproduce(
        ReproduceRequest(
            grids=tuple(args.grid),
            overrides=tuple(args.set),
            root=args.root,
            profile=args.profile,
            dry_run=args.dry_run,
            local=args.local,
            preflight=not args.no_preflight,
            frozen=not args.no_frozen,
            num_parts=args.num_parts,
            resources=resources(args.resources),
            pair_resources=resources(args.pair_resources, "--pair-resources"),
            throughput=args.throughput,
            stage=args.stage,
        )
    )


def add_reproduce_parser(command) -> None:
    p = command(
        "reproduce",
        cmd_reproduce,
        "the whole chain: doctor, pairing and shards, the grid(s), frozen features, the report (SLURM jobs with "
        "dependencies)",
        config=False,
    )
    p.add_argument("--grid", action="append", required=True, help="grid file (configs/grids/*.yaml); repeatable")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override in every cell")
    add_root_flag(p)
    p.add_argument("--profile", help="cluster profile (name or path); default: the first grid's `profile`")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the chain, its checks and cost; submit nothing")
    mode.add_argument("--local", action="store_true", help="run every stage here (submitit's local executor)")
    p.add_argument("--no-preflight", action="store_true", help="skip the doctor stage and the grids' pre-flight")
    p.add_argument(
        "--no-frozen",
        action="store_true",
        help="skip stage 4 (k-NN and few-shot of each Table 1 backbone): the report then has no frozen-feature table",
    )
    p.add_argument("--num-parts", type=int, default=16, help="shard parts per shard directory (default 16)")
    for flag, what in (("--resources", "shard"), ("--pair-resources", "pairing")):
        p.add_argument(
            flag, action="append", default=[], metavar="KEY=VALUE", help=f"profile field for the {what} jobs"
        )
    p.add_argument("--throughput", metavar="FILE", help="--dry-run cost at a measured throughput (as clipit grid)")
    p.add_argument(
        "--stage", choices=["all", "grids"], default="all", help="grids: from the grids on (what the chain's job runs)"
    )


def add_hpc_commands(sub, common, command) -> None:
    """grid (with status and cancel), prepare (demo, reports, pair, shards) and reproduce on `sub`;
    `command` is cli.build_parser's subcommand factory."""
    grid = command(
        "grid",
        cmd_grid,
        "submit a grid of runs (configs/grids/*.yaml) as SLURM job arrays; `grid status` and "
        "`grid cancel` follow and stop it",
        config=False,
    )
    add_config_flags(grid, required=False, what="grid file (configs/grids/*.yaml)")
    add_cluster_flags(grid, "the grid's `profile`")
    add_root_flag(grid)
    grid.add_argument(
        "--force-unknown",
        action="store_true",
        help="resubmit cells whose job state cannot be checked (no squeue, or an unreadable state.json)",
    )
    grid.add_argument(
        "--no-preflight",
        action="store_true",
        help="skip the pre-flight (`clipit doctor`'s checks of every config to submit): submit even if "
        "shards, weights or warm starts are missing",
    )
    grid.add_argument(
        "--throughput",
        metavar="FILE",
        help="--dry-run cost at the throughput a `make gpu-check` "
        "measured (its .md or .json; default runs/gpu-check.json if present, else assumed)",
    )

    grid_actions = grid.add_subparsers(dest="action", metavar="ACTION", parser_class=ChoicesHelpParser)
    for name, func, help_ in (
        (
            "status",
            cmd_grid_status,
            "the grid's cells by state (done, running, queued, failed with its error line, lost, unknown, "
            "not submitted), counts and an ETA",
        ),
        ("cancel", cmd_grid_cancel, "cancel the grid's queued and running jobs (scancel the job ids in the ledger)"),
    ):
        action = command(name, func, help_, grid_actions, config=False)
        add_config_flags(action, what="grid file (configs/grids/*.yaml)")
        add_root_flag(action)

    prepare = sub.add_parser(
        "prepare",
        help="inputs: the demo's generated data here; pairing and shards as SLURM array jobs",
        parents=[common],
    )
    prepare_sub = prepare.add_subparsers(dest="action", required=True, metavar="STAGE", parser_class=ChoicesHelpParser)
    prepare_demo_ = command(
        "demo",
        cmd_prepare_demo,
        "generate the demo's images, report corpus and demo CLIP into the config's paths (skips what exists)",
        prepare_sub,
    )
    add_overwrite_flag(prepare_demo_, "demo images")
    reports = command(
        "reports",
        cmd_prepare_reports,
        "join TCGA-Reports with its cancer types into the id,text,project csv the paper configs read",
        prepare_sub,
        config=False,
    )
    reports.add_argument("--csv", required=True, help="TCGA_Reports.csv (or its .zip): patient_filename,text")
    reports.add_argument("--project-map", required=True, help="tcga_patient_to_cancer_type.csv: patient_id,cancer_type")
    reports.add_argument("--out", required=True, help="the csv to write, e.g. data/tcga/reports.csv")
    reports.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_reproduce_parser(command)
    for name, func, help_ in (
        ("pair", cmd_prepare_pair, "`clipit pair` as an array: one task per pairing dir"),
        (
            "shards",
            cmd_prepare_shards,
            "`clipit shard build --part I --num-parts N` as arrays, then --finalize per shard dir",
        ),
    ):
        p = command(name, func, help_, prepare_sub, config=False)
        source = p.add_mutually_exclusive_group(required=True)
        source.add_argument("--grid", help="grid file: every pairing/shard dir its cells read")
        source.add_argument("--config", metavar="YAML", help="one experiment config")
        p.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config value (with --grid: in every cell)",
        )
        p.add_argument(
            "--print-config", action="store_true", help="print the resolved config (or grid) as YAML and exit"
        )
        add_cluster_flags(p, "the grid's profile, else local-cluster")
        add_root_flag(p)
        p.add_argument(
            "--no-preflight",
            action="store_true",
            help="skip the pre-flight (`clipit doctor`'s checks of the data, corpus and pairing model)",
        )
        p.add_argument(
            "--resources",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a profile field for these jobs, e.g. partition=cpu, gpus_per_node=0",
        )
        if name == "shards":
            p.add_argument("--num-parts", type=int, default=16, help="array tasks per shard directory (default 16)")
            p.add_argument("--pair", action="store_true", help="submit the pairing first; parts wait for it (afterok)")
            p.add_argument(
                "--pair-resources",
                action="append",
                default=[],
                metavar="KEY=VALUE",
                help="profile overrides for the pairing jobs (they need a GPU on real data)",
            )
