"""`clipit` command line: each subcommand parses its arguments and calls one library function.

Errors users can fix (bad config, bad data, missing weights) print one line and exit 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _user_errors() -> tuple[type, ...]:
    from clipit.config import ConfigError
    from clipit.data.base import DatasetError
    from clipit.export import ExportError
    from clipit.models.backbones import BackboneError
    from clipit.pairing.models import PairingModelError
    from clipit.reports import ReportError
    from clipit.shards import ShardError

    return ConfigError, DatasetError, BackboneError, ExportError, PairingModelError, ReportError, ShardError


def _config(args):
    from clipit.config import load_config

    return load_config(args.config, args.set)


def cmd_demo(args) -> None:
    from clipit.pipeline import run_all

    start = time.time()
    run_all(_config(args))
    print(f"demo finished in {time.time() - start:.0f} s")


def cmd_pair(args) -> None:
    from clipit.pipeline import build_image_dataset, class_agreement, load_corpus, run_pairing

    cfg = _config(args)
    dataset, reports = build_image_dataset(cfg), load_corpus(cfg)
    paths = run_pairing(cfg, dataset, reports)
    print(json.dumps({s: str(p) for s, p in paths.items()}, indent=2))
    from clipit.pairing.texts import pairing_texts

    agreement = class_agreement(dataset, pairing_texts(cfg, dataset, reports), paths)
    if agreement:
        print(f"class agreement {100 * agreement['all']:.1f}% (chance {100 * agreement['chance']:.1f}%)")


def cmd_shard(args) -> None:
    from clipit.pipeline import build_image_dataset, load_corpus, run_pairing, run_shards
    from clipit.shard_stage import require_pairs
    from clipit.shards import ShardError

    if (args.part is None) != (args.num_parts is None):
        raise ShardError("give --part I and --num-parts N together (0 <= I < N)")
    cfg = _config(args)
    dataset, reports = build_image_dataset(cfg), load_corpus(cfg)
    if args.part is None and not args.finalize:
        pairs = run_pairing(cfg, dataset, reports)
    else:  # parts never pair (N jobs would each pair everything): `clipit pair` runs once before them
        pairs = require_pairs(cfg, dataset, reports)
    manifest = run_shards(cfg, dataset, reports, pairs, part=args.part, num_parts=args.num_parts,
                          finalize=args.finalize)
    if manifest is not None:
        print(manifest)


def cmd_shards_validate(args) -> None:
    from clipit.shards import validate_shards

    counts = validate_shards(args.dir)
    print("ok: " + ", ".join(f"{split} {n}" for split, n in counts.items()))


def cmd_train(args) -> None:
    from clipit.pipeline import train_and_evaluate

    from clipit.training.accel import leave_process_group

    cfg = _config(args)
    seeds = [args.seed] if args.seed is not None else cfg.seeds
    succeeded = False
    try:
        for seed in seeds:
            if args.resume == "none":  # start over: drop this cell's resume checkpoint and outputs
                import shutil

                from clipit.pipeline import run_dir_for

                shutil.rmtree(run_dir_for(cfg, args.method, seed), ignore_errors=True)
            metrics = train_and_evaluate(cfg, args.method, seed)
            print(f"{args.method} seed {seed}: balanced accuracy {100 * metrics['balanced_accuracy']:.2f}%")
        succeeded = True
    finally:
        distributed = leave_process_group(succeeded)
    if distributed:  # outputs are on disk; skip interpreter teardown, where gloo's threads can still abort
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def cmd_doctor(args) -> int:
    from clipit.config import load_config
    from clipit.doctor import run_doctor

    if bool(args.config_path) == bool(args.config):
        print("clipit: error: give the config once: clipit doctor CONFIG (or --config CONFIG)", file=sys.stderr)
        return 2
    return run_doctor(load_config(args.config_path or args.config, args.set))


def cmd_export(args) -> None:
    from clipit.export import export_run

    out = export_run(args.run_dir, args.out_dir)
    print(f"exported {args.run_dir} -> {out} (model.safetensors, config.json)")


def cmd_predict(args) -> None:
    from clipit.export import predict_files

    classes, probs = predict_files(args.model_dir, args.images, device=args.device, batch_size=args.batch_size)
    if args.json:
        print(json.dumps([{"image": str(path), "prediction": classes[int(p.argmax())],
                           "probabilities": dict(zip(classes, map(float, p)))} for path, p in zip(args.images, probs)]))
        return
    print("\t".join(["image", "prediction", *classes]))
    for path, p in zip(args.images, probs):
        print("\t".join([str(path), classes[int(p.argmax())], *(f"{x:.6f}" for x in p)]))


def cmd_report(args) -> int:
    from clipit.report import build_report

    try:
        result = build_report(args.runs_dir, args.out, metric=args.metric, plots=not args.no_plots)
    except FileNotFoundError as err:
        print(f"clipit: error: {err}", file=sys.stderr)
        return 2
    print(result["markdown"])
    print("wrote " + ", ".join(result["files"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clipit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(name: str, func, help_: str):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--config", required=True, help="YAML file under configs/")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set methods.clipit.lr=1e-4 (repeatable)")
        p.set_defaults(func=func)
        return p

    with_config("demo", cmd_demo, "run every stage on the embedded demo data")
    with_config("pair", cmd_pair, "pair every image with its most similar report (Eq. 1)")
    shard = with_config("shard", cmd_shard, "write WebDataset shards (pairing first if needed)")
    shard.add_argument("--part", type=int, help="write only part I of --num-parts N (e.g. $SLURM_ARRAY_TASK_ID); "
                       "needs the pairs (`clipit pair`) first")
    shard.add_argument("--num-parts", type=int, help="number of parts (e.g. $SLURM_ARRAY_TASK_COUNT)")
    shard.add_argument("--finalize", action="store_true", help="only write the manifest (all shards must exist)")
    train = with_config("train", cmd_train, "train and evaluate one method (all seeds, or --seed)")
    train.add_argument("--method", required=True)
    train.add_argument("--seed", type=int)
    train.add_argument("--resume", choices=["latest", "none"], default="latest",
                       help="latest (default): continue from the cell's latest checkpoint; none: start over")
    shards = sub.add_parser("shards", help="shard utilities")
    shards_sub = shards.add_subparsers(dest="action", required=True)
    validate = shards_sub.add_parser("validate", help="check shards against their manifest")
    validate.add_argument("dir")
    validate.set_defaults(func=cmd_shards_validate)
    doctor = sub.add_parser("doctor", help="check the weights, paths and dimensions a config needs (exit 2 on a problem)")
    doctor.add_argument("config_path", nargs="?", metavar="CONFIG", help="YAML file under configs/")
    doctor.add_argument("--config", help="same as CONFIG")
    doctor.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    doctor.set_defaults(func=cmd_doctor)
    export = sub.add_parser("export", help="merge LoRA and save a run as a vision-only inference model")
    export.add_argument("run_dir", help="runs/<method>/seed-<n> of a finished run")
    export.add_argument("out_dir")
    export.set_defaults(func=cmd_export)
    predict = sub.add_parser("predict", help="class probabilities per image from an exported model")
    predict.add_argument("model_dir", help="a folder written by `clipit export`")
    predict.add_argument("images", nargs="+", metavar="IMAGE")
    predict.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    predict.add_argument("--batch-size", type=int, default=32)
    predict.add_argument("--json", action="store_true", help="one JSON list instead of a table")
    predict.set_defaults(func=cmd_predict)
    report = sub.add_parser("report", help="Table 1, ablations, Omega and figures from run directories")
    report.add_argument("runs_dir", metavar="RUNS_DIR", help="folder searched for run directories (metrics.json)")
    report.add_argument("--out", help="output folder (default RUNS_DIR/report)")
    report.add_argument("--metric", default="balanced_accuracy", choices=["balanced_accuracy", "accuracy"])
    report.add_argument("--no-plots", action="store_true", help="tables only")
    report.set_defaults(func=cmd_report)

    args = parser.parse_args(argv)
    try:
        status = args.func(args)
    except _user_errors() as err:
        print(f"clipit: error: {err}", file=sys.stderr)
        return 2
    return status if isinstance(status, int) else 0


if __name__ == "__main__":
    sys.exit(main())
