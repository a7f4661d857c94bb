"""The data-side commands of `clipit` (demo, doctor, pair, shard build|validate): their flags and the stage
each runs to make or check a config's inputs, pairs and shards. clipit/cli.py adds them to its parser and
runs them."""

from __future__ import annotations

import json
import time

from clipit.cli_flags import (
    ChoicesHelpParser,
    add_config_flags,
    add_overwrite_flag,
    add_root_flag,
    config_of,
    source_of,
)


def cmd_demo(args) -> None:
    from clipit.pipeline import run_all

    start = time.time()
    run_all(config_of(args), source_of(args), overwrite=args.overwrite)
    print(f"demo finished in {time.time() - start:.0f} s")


def cmd_doctor(args) -> int:
    from clipit.config import ConfigError, load_config
    from clipit.doctor import run_doctor
    from clipit.hpc.grid_file import is_grid_file

    if bool(args.config_path) == bool(args.config):
        raise ConfigError("give the config once: clipit doctor CONFIG (or --config CONFIG)")
    path = args.config_path or args.config
    if is_grid_file(path):
        from clipit.hpc.preflight import doctor_grid
        from clipit.hpc.requests import GridQuery

        return doctor_grid(GridQuery(grid=path, overrides=tuple(args.set), root=args.root))
    if args.root:
        raise ConfigError(f"--root is for grid files; {path} is an experiment config (set output_dir instead)")
    return run_doctor(load_config(path, args.set))


def cmd_pair(args) -> None:
    from clipit.pipeline import pair_stage

    if args.from_reference:  # = --set pairing.from_reference=DIR (a JSON string is a YAML string)
        args.set = [*(args.set or []), f"pairing.from_reference={json.dumps(args.from_reference)}"]
    paths = pair_stage(config_of(args), overwrite=args.overwrite)
    print(json.dumps({s: str(p) for s, p in paths.items()}, indent=2))


def cmd_shard_build(args) -> None:
    from clipit.pipeline import shard_stage

    manifest = shard_stage(
        config_of(args), part=args.part, num_parts=args.num_parts, finalize=args.finalize, overwrite=args.overwrite
    )
    if manifest is not None:
        print(manifest)


def cmd_shard_validate(args) -> None:
    from clipit.shards.validate import validate_shards

    counts = validate_shards(args.dir, quick=args.quick)
    print(
        "ok: "
        + ", ".join(f"{split} {n}" for split, n in counts.items())
        + (" (quick: checksums and counts only; run without --quick to decode every sample)" if args.quick else "")
    )


def add_data_commands(sub, common, command) -> None:
    """demo, doctor, pair and shard (build, validate) on `sub`; `command` is cli.build_parser's subcommand
    factory."""
    demo_ = command("demo", cmd_demo, "run every stage on the embedded demo data")
    add_overwrite_flag(demo_, "inputs, pairs, shards and runs")
    doctor = command(
        "doctor",
        cmd_doctor,
        "check the weights, paths and dimensions a config needs (exit 2 on a problem)",
        config=False,
    )
    doctor.add_argument(
        "config_path",
        nargs="?",
        metavar="CONFIG",
        help="same as --config; a grid file (configs/grids/*.yaml) checks every distinct config of its cells",
    )
    doctor.lists_choices = True
    add_config_flags(doctor, required=False)
    add_root_flag(doctor)
    pair = command("pair", cmd_pair, "pair every image with its most similar report (Eq. 1)")
    pair.add_argument(
        "--from-reference",
        metavar="DIR",
        help="map the reference code's <dataset>_<split>_indexes.npy in DIR onto the samples instead of searching "
        "(= --set pairing.from_reference=DIR; docs/reproduce.md)",
    )
    add_overwrite_flag(pair, "pairs (and demo images)")

    shard = sub.add_parser("shard", help="build or validate WebDataset shards", parents=[common])
    shard_sub = shard.add_subparsers(dest="action", required=True, metavar="ACTION", parser_class=ChoicesHelpParser)
    build = command("build", cmd_shard_build, "write a config's shard set (pairing first if needed)", shard_sub)
    build.add_argument(
        "--part",
        type=int,
        help="write only part I of --num-parts N (e.g. $SLURM_ARRAY_TASK_ID); needs the pairs (`clipit pair`) first",
    )
    build.add_argument("--num-parts", type=int, help="number of parts (e.g. $SLURM_ARRAY_TASK_COUNT)")
    build.add_argument("--finalize", action="store_true", help="only write the manifest (all shards must exist)")
    add_overwrite_flag(build, "a shard set (and its pairs)")
    validate = command(
        "validate",
        cmd_shard_validate,
        "check a shard set against its manifest: checksums and "
        "counts, then every sample decoded (image, label, embedding, json; keys unique)",
        shard_sub,
        config=False,
    )
    validate.add_argument("dir", metavar="SHARD_DIR")
    validate.add_argument(
        "--quick",
        action="store_true",
        help="only the manifest, the checksums and the counts: reads each tar once (disk speed) "
        "instead of decoding every image",
    )
