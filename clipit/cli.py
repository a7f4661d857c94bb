"""`clipit` command line: one subcommand per stage, each parsing its flags and calling one library function.

Errors users can fix (every `clipit.errors.ClipitError`) print one line and exit 2; `--debug` shows
the traceback. The same flag means the same thing everywhere: `--config` (one YAML file), `--set
KEY=VALUE` (repeatable override), `--profile`, `--dry-run`, `--local`, `--wait`, `--root` (a grid's root
folder), `--no-preflight`, `--overwrite` (replace output made under another config; clipit/identity.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
import traceback
import warnings

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from clipit import __version__
from clipit.cli_flags import (
    ChoicesHelpParser,
    add_cell_flags,
    add_config_flags,
    add_overwrite_flag,
    add_root_flag,
    config_of,
    source_of,
)
from clipit.cli_hpc import add_hpc_commands
from clipit.errors import ClipitError, one_line

# ---------------------------------------------------------------------------------------------
# Commands


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


def _seeds(cfg, args) -> list[int]:
    return [args.seed] if args.seed is not None else list(cfg.seeds)


@contextlib.contextmanager
def one_cell():
    """A cell run in this process: a distributed launch leaves its process group cleanly at the end."""
    from clipit.training.accel import leave_process_group

    succeeded = False
    try:
        yield
        succeeded = True
    finally:
        leave_process_group(succeeded)


def run_seed_chain(args, command: str, seeds: list[int], *extra: str) -> None:
    """Several seeds: a chain of cells, one process each (clipit/cells.py); one line if any failed."""
    from clipit.pipeline import run_cells, seed_cells
    from clipit.training.accel import check_launch

    check_launch(int(os.environ.get("WORLD_SIZE", 1)))  # the children cannot see the launcher's command line
    run_cells(seed_cells(source_of(args), command, args.method, seeds, *extra))


def cmd_train(args) -> None:
    from clipit import layout
    from clipit.pipeline import check_method, train_and_evaluate
    from clipit.training.accel import make_accelerator

    cfg = config_of(args)
    check_method(cfg, args.method)
    seeds = _seeds(cfg, args)
    if len(seeds) > 1:
        return run_seed_chain(args, "train", seeds, "--resume", args.resume, *overwrite_flag(args))
    seed = seeds[0]
    with one_cell():
        accelerator = make_accelerator(cfg.methods[args.method])
        run_dir = layout.run_dir(cfg.output_dir, args.method, seed)
        # start over (--resume none), or replace a run made under another config (--overwrite): rank 0
        # drops this cell's resume checkpoint and outputs
        if accelerator.is_main_process and (
            args.resume == "none" or (args.overwrite and stale_run(cfg, args.method, seed))
        ):
            clear_run_dir(run_dir)
        accelerator.wait_for_everyone()
        metrics = train_and_evaluate(cfg, args.method, seed, overwrite=args.overwrite)
        if accelerator.is_main_process:  # one result line, not one per rank
            print(f"{args.method} seed {seed}: balanced accuracy {100 * metrics['balanced_accuracy']:.2f}%")


def overwrite_flag(args) -> list[str]:
    """`--overwrite` again for the cells a chain starts, when this command got it."""
    from clipit.identity import OVERWRITE

    return [OVERWRITE] if getattr(args, "overwrite", False) else []


def stale_run(cfg, method: str, seed: int) -> bool:
    """`--overwrite`: whether the cell's run directory holds a run (or resume checkpoint) made under
    another config; says so in one line on stdout."""
    from clipit.reruns import stale_run_changes

    changes = stale_run_changes(cfg, method, seed)
    if changes:
        print(f"--overwrite: replacing {method} seed {seed}, made under another config ({changes})", flush=True)
    return bool(changes)


def clear_run_dir(run_dir) -> None:
    """`--resume none`: empty a run directory, holding its lock (a process still training it keeps it;
    the lock file itself stays, so a later writer locks the same file)."""
    import shutil

    from clipit.locks import LOCK_FILE, exclusive

    if not run_dir.is_dir():
        return
    with exclusive(run_dir, "run directory"):
        for entry in run_dir.iterdir():
            if entry.name == LOCK_FILE:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()


def cmd_evaluate(args) -> None:
    from clipit.pipeline import check_method, evaluate_cell

    cfg = config_of(args)
    check_method(cfg, args.method)
    seeds = _seeds(cfg, args)
    if len(seeds) > 1:
        return run_seed_chain(
            args,
            "evaluate",
            seeds,
            "--split",
            args.split,
            *(["--frozen"] if args.frozen else []),
            *overwrite_flag(args),
        )
    if args.frozen:
        from clipit.pipeline import frozen_eval_cell

        with one_cell():
            result = frozen_eval_cell(cfg, args.method, seeds[0])
        shots = ", ".join(f"{n}-shot {100 * s['mean']:.2f}" for n, s in result["simpleshot"]["shots"].items())
        print(
            f"{args.method} seed {seeds[0]} frozen features: k-NN balanced accuracy {100 * result['knn']['balanced_accuracy']:.2f}%; "
            f"SimpleShot balanced accuracy {shots}"
        )
        return None
    with one_cell():
        metrics = evaluate_cell(cfg, args.method, seeds[0], split=args.split, overwrite=args.overwrite)
        print(
            f"{args.method} seed {seeds[0]} {args.split}: balanced accuracy {100 * metrics['balanced_accuracy']:.2f}%, "
            f"accuracy {100 * metrics['accuracy']:.2f}%"
        )


def cmd_export(args) -> None:
    from clipit.evaluation.export import export_or_keep

    out, written = export_or_keep(args.run_dir, args.out_dir, overwrite=args.overwrite)
    if not written:
        print(f"{args.out_dir}: holds the export of {args.run_dir} already (same run identity and checkpoint)")
        return
    print(f"exported {args.run_dir} -> {out} ({', '.join(sorted(p.name for p in out.iterdir() if p.is_file()))})")


def cmd_predict(args) -> None:
    from clipit.evaluation.predict_output import reader_may_leave

    with reader_may_leave():  # `clipit predict ... | head`
        _predict(args)


def _predict(args) -> None:
    from clipit.evaluation.inference import run_predict

    summary = run_predict(
        args.model_dir,
        args.inputs,
        out=args.out,
        features=args.features,
        split=args.split,
        device=args.device,
        batch_size=args.batch_size,
        mpp=args.mpp,
        target_mpp=args.target_mpp,
        min_tissue=args.min_tissue,
        tile=args.tile,
        heatmap_class=args.heatmap_class,
        stdout_json=args.json,
    )
    if args.out:  # without --out the rows themselves are stdout
        slides = "".join(f"; {path}: {n} tissue tiles" for path, n in summary["slides"].items())
        print(
            f"wrote {summary['rows']} rows to {args.out}{slides}"
            + "".join(f"\nheatmap: {p}" for p in summary["heatmaps"])
            + (f"\nfeatures: {args.features}" if args.features else "")
        )


def cmd_report(args) -> None:
    from clipit.results.report import build_report

    result = build_report(
        args.runs_dir,
        args.out,
        metric=args.metric,
        plots=not args.no_plots,
        tolerance=args.tolerance,
        references=args.references,
    )
    print(result["markdown"])
    print("wrote " + ", ".join(result["files"]))


# ---------------------------------------------------------------------------------------------
# The parser


def build_parser() -> argparse.ArgumentParser:
    parser = ChoicesHelpParser(prog="clipit", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"clipit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    common = argparse.ArgumentParser(add_help=False)  # --debug after the subcommand works too
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=ChoicesHelpParser)

    def command(name: str, func, help_: str, parent=sub, config: bool = True) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=help_, description=help_, parents=[common])
        p.lists_choices = config
        if config:
            add_config_flags(p)
        p.set_defaults(func=func)
        return p

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

    train = command("train", cmd_train, "train and evaluate one method of the config (all seeds, or --seed)")
    add_cell_flags(train)
    train.add_argument(
        "--resume",
        choices=["latest", "none"],
        default="latest",
        help="latest (default): continue from the cell's latest checkpoint; none: start over",
    )
    add_overwrite_flag(train, "a finished run or resume checkpoint of this cell")
    evaluate = command("evaluate", cmd_evaluate, "evaluate a trained method on a split (metrics, predictions)")
    add_cell_flags(evaluate)
    evaluate.add_argument("--split", default="test", choices=["test", "val", "train"])
    evaluate.add_argument(
        "--frozen",
        action="store_true",
        help="k-NN (cosine, k=20) and SimpleShot (1-16 shots) on the run's frozen backbone features: "
        "train as the labelled set, test as queries (frozen_eval.json)",
    )
    add_overwrite_flag(evaluate, "metrics of this split")

    export = command("export", cmd_export, "merge LoRA and save a run as a vision-only inference model", config=False)
    export.add_argument("run_dir", metavar="RUN_DIR", help="<output_dir>/runs/<method>/seed-<n> of a finished run")
    export.add_argument("out_dir", metavar="OUT_DIR")
    add_overwrite_flag(export, "an export in OUT_DIR")
    predict = command(
        "predict",
        cmd_predict,
        "class probabilities from an exported model for images, folders, globs, "
        "shard sets and whole-slide images (docs/predict.md)",
        config=False,
    )
    predict.add_argument("model_dir", metavar="MODEL_DIR", help="a folder written by `clipit export`")
    predict.add_argument(
        "inputs", nargs="+", metavar="INPUT", help="image, folder (recursive), glob, shard dir or slide"
    )
    predict.add_argument(
        "--out",
        help="FILE.csv or FILE.json: one row per image / tissue tile (slides: heatmap PNG "
        "next to it); default: a table on stdout",
    )
    predict.add_argument("--features", metavar="FILE.safetensors", help="also save the backbone embedding of every row")
    predict.add_argument("--split", default="test", help="split of a shard set (default test)")
    predict.add_argument("--mpp", type=float, help="µm per level-0 pixel of slides that do not record it (and --tile)")
    predict.add_argument("--target-mpp", type=float, help="µm per model-input pixel (default: the training dataset's)")
    predict.add_argument("--min-tissue", type=float, default=0.5, help="tissue fraction a slide tile needs (0.5)")
    predict.add_argument("--tile", action="store_true", help="predict large plain images tile by tile (needs --mpp)")
    predict.add_argument("--heatmap-class", help="heatmap of this class's probability (default: predicted class)")
    predict.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    predict.add_argument("--batch-size", type=int, default=32)
    predict.add_argument("--json", action="store_true", help="without --out: one JSON list instead of a table")
    report = command("report", cmd_report, "Table 1, ablations, Omega and figures from run directories", config=False)
    report.add_argument("runs_dir", metavar="RUNS_DIR", help="folder searched for run directories (metrics.json)")
    report.add_argument("--out", help="output folder (default RUNS_DIR/report)")
    report.add_argument("--metric", default="balanced_accuracy", choices=["balanced_accuracy", "accuracy"])
    report.add_argument("--no-plots", action="store_true", help="tables only")
    from clipit.results.references import DEFAULT_TOLERANCE  # stdlib only: cheap at parser build time

    report.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        metavar="POINTS",
        help=f"flag a cell further than this many percentage points from a published number (default {DEFAULT_TOLERANCE:g})",
    )
    report.add_argument(
        "--references",
        action="append",
        default=[],
        metavar="FILE.csv",
        help="more reference rows (columns as clipit/results/reference_data/*.csv); repeatable",
    )

    add_hpc_commands(sub, common, command)
    return parser


def printconfig_of(args) -> None:
    """`--print-config`: the experiment config as the command would run it, or a grid file as loaded
    (its cells' configs: `clipit grid --dry-run`), as YAML on stdout."""
    import yaml

    from clipit.config import load_config, to_dict

    grid_file = getattr(args, "grid", None) or (args.config if args.command == "grid" else None)
    if args.command == "doctor" and (args.config_path or args.config):
        from clipit.hpc.grid_file import is_grid_file

        grid_file = args.config_path or args.config if is_grid_file(args.config_path or args.config) else None
    if grid_file:
        from clipit.hpc.grid_file import load_grid

        data = to_dict(load_grid(grid_file)) | ({"overrides_of_every_cell": list(args.set)} if args.set else {})
    else:
        data = to_dict(load_config(getattr(args, "config_path", None) or args.config, args.set))
    print(yaml.safe_dump(data, sort_keys=False), end="")


# Third-party messages that are wrong or noise for clipit, dropped once per process (every rank and cell runs
# main): (logger name, message start). open_clip builds its towers without weights on purpose (clipit loads
# them itself, strictly); DeepSpeed says it found no GPU on every rank of a CPU run.
KNOWN_NOISE = (
    ("", "No pretrained weights loaded for model"),
    ("DeepSpeed", "Setting accelerator to CPU"),
)
# DDP on LoRA's Conv2d adapters: a performance hint about gradient layout, not a fault (once per rank)
KNOWN_WARNINGS = ("Grad strides do not match bucket view strides",)


class _DropMessage(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.start)


def quiet_known_noise() -> None:
    for name, start in KNOWN_NOISE:
        logger = logging.getLogger(name or None)
        if not any(isinstance(f, _DropMessage) and f.start == start for f in logger.filters):
            logger.addFilter(_DropMessage(start))
    for message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


def main(argv: list[str] | None = None) -> int:
    from clipit.errors import disk_full_is_an_error

    quiet_known_noise()
    args = build_parser().parse_args(argv)
    try:
        with disk_full_is_an_error():  # ENOSPC/EDQUOT from a writer outside clipit/io.py: one line too
            status = printconfig_of(args) if getattr(args, "print_config", False) else args.func(args)
    except ClipitError as err:
        if args.debug:
            traceback.print_exc()
        print(f"clipit: error: {one_line(err, limit=2000)}", file=sys.stderr)
        return err.exit_code
    return status if isinstance(status, int) else 0


if __name__ == "__main__":
    sys.exit(main())
