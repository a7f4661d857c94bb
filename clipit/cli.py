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
    from clipit.models.backbones import BackboneError
    from clipit.pairing.models import PairingModelError
    from clipit.reports import ReportError
    from clipit.shards import ShardError

    return ConfigError, DatasetError, BackboneError, PairingModelError, ReportError, ShardError


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
    agreement = class_agreement(dataset, reports, paths)
    if agreement:
        print(f"class agreement {100 * agreement['all']:.1f}% (chance {100 * agreement['chance']:.1f}%)")


def cmd_shard(args) -> None:
    from clipit.pipeline import build_image_dataset, load_corpus, run_pairing, run_shards

    cfg = _config(args)
    dataset, reports = build_image_dataset(cfg), load_corpus(cfg)
    print(run_shards(cfg, dataset, reports, run_pairing(cfg, dataset, reports)))


def cmd_shards_validate(args) -> None:
    from clipit.shards import validate_shards

    counts = validate_shards(args.dir)
    print("ok: " + ", ".join(f"{split} {n}" for split, n in counts.items()))


def cmd_train(args) -> None:
    from clipit.pipeline import train_and_evaluate

    cfg = _config(args)
    seeds = [args.seed] if args.seed is not None else cfg.seeds
    for seed in seeds:
        metrics = train_and_evaluate(cfg, args.method, seed)
        print(f"{args.method} seed {seed}: balanced accuracy {100 * metrics['balanced_accuracy']:.2f}%")


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
    with_config("shard", cmd_shard, "write WebDataset shards (pairing first if needed)")
    train = with_config("train", cmd_train, "train and evaluate one method (all seeds, or --seed)")
    train.add_argument("--method", required=True)
    train.add_argument("--seed", type=int)
    shards = sub.add_parser("shards", help="shard utilities")
    shards_sub = shards.add_subparsers(dest="action", required=True)
    validate = shards_sub.add_parser("validate", help="check shards against their manifest")
    validate.add_argument("dir")
    validate.set_defaults(func=cmd_shards_validate)

    args = parser.parse_args(argv)
    try:
        args.func(args)
    except _user_errors() as err:
        print(f"clipit: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
