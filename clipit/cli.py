"""`clipit` command line: one subcommand per stage, each parsing its flags and calling one library function.

Errors users can fix (every `clipit.errors.ClipitError`) print one line and exit 2; `--debug` shows
the traceback. The same flag means the same thing everywhere: `--config` (one YAML file), `--set
KEY=VALUE` (repeatable override), `--profile`, `--dry-run`, `--local`, `--wait`, `--root` (a grid's root
folder), `--no-preflight`, `--overwrite` (replace output made under another config; clipit/identity.py).

This module assembles the parser, handles errors and dispatches; the commands and their flags live in
clipit/cli_data.py (demo, doctor, pair, shard), clipit/cli_runs.py (train, evaluate, export, predict, report)
and clipit/cli_hpc.py (grid, prepare, reproduce), the shared flags in clipit/cli_flags.py.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
import warnings

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from clipit import __version__
from clipit.cli_data import add_data_commands
from clipit.cli_flags import ChoicesHelpParser, add_config_flags
from clipit.cli_hpc import add_hpc_commands
from clipit.cli_runs import add_run_commands
from clipit.errors import ClipitError, one_line


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

    # in this order in `clipit --help`
    add_data_commands(sub, common, command)
    add_run_commands(sub, common, command)
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
