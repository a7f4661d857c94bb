"""The run-side commands of `clipit` (train, evaluate, export, predict, report): their flags, a cell run in
this process or a chain of seeds, and the one result line each prints. clipit/cli.py adds them to its parser
and runs them."""

from __future__ import annotations

import contextlib
import os

from clipit.cli_flags import add_cell_flags, add_overwrite_flag, config_of, source_of


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


def add_run_commands(sub, common, command) -> None:
    """train, evaluate, export, predict and report on `sub`; `command` is cli.build_parser's subcommand
    factory."""
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
