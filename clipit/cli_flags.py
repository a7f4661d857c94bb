"""The flags every `clipit` subcommand shares, defined once (clipit/cli.py and its command modules use them):
--config/--set/--print-config, the cluster flags, --root, --overwrite, a cell's --method/--seed; and the
--help that lists the valid config names."""

from __future__ import annotations

import argparse


def valid_choices() -> str:
    """The names a config may use, read from their registries (so --help never goes stale)."""
    from clipit.config import TrainConfig
    from clipit.data.registry import DATASETS
    from clipit.methods import method_names
    from clipit.models.backbones import BACKBONES

    finetune = TrainConfig.__dataclass_fields__["finetune"].type
    return (
        f"method kinds (methods.<name>.method): {', '.join(method_names())}\n"
        f"fine-tuning (methods.<name>.finetune): {finetune.replace('Literal', '').strip('[]')}\n"
        f"backbones (model.backbone): {', '.join(BACKBONES)}, or timm:<name>\n"
        f"datasets (data.name): demo, {', '.join(DATASETS)}\n"
        "every config key: docs/config.md"
    )


class ChoicesHelpParser(argparse.ArgumentParser):
    """--help of a config-taking command ends with the valid methods, backbones and datasets (built only
    when help is shown: reading the registries imports torch)."""

    lists_choices = False

    def format_help(self) -> str:
        return super().format_help() + ("\n" + valid_choices() + "\n" if self.lists_choices else "")


# ---------------------------------------------------------------------------------------------
# Shared flags: defined once, used by every subcommand that takes them


def add_config_flags(parser: argparse.ArgumentParser, required: bool = True, what: str = "experiment config") -> None:
    parser.add_argument(
        "--config",
        required=required,
        metavar="YAML",
        help=f"{what} (YAML, e.g. configs/demo.yaml; relative paths in it are relative to the "
        "working directory, ${VAR} and ${CONFIG_DIR} are expanded; keys: docs/config.md)"
        if "grid" not in what
        else f"{what}; the config files it names (base, a value's config) are relative to its folder, "
        "data and output paths to the working directory",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set methods.clipit.lr=1e-4 (repeatable)",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (overrides applied, paths expanded) as YAML and exit",
    )


def add_cluster_flags(parser: argparse.ArgumentParser, default_profile: str) -> None:
    parser.add_argument(
        "--profile",
        help="cluster profile: a name (./slurm/profiles/NAME.yaml, else the shipped "
        f"clipit/hpc/profiles/NAME.yaml) or a path; default: {default_profile}",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print what would run; submit nothing")
    mode.add_argument("--local", action="store_true", help="run with submitit's local executor on this machine (waits)")
    parser.add_argument("--wait", action="store_true", help="after submitting to SLURM, wait for the jobs")


def add_root_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--root",
        help="replace the grid's root folder (where {root} points); give the same --root (and --set) to "
        "every command of one grid: prepare, grid, grid status, grid cancel, doctor",
    )


def add_overwrite_flag(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help=f"replace {what} made under another config (without it such output stops the command with "
        "one line naming the changed keys; output made under this config is reused either way)",
    )


def add_cell_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--method", required=True, help="a method name from the config's `methods` (its kinds are listed below)"
    )
    parser.add_argument("--seed", type=int, help="one seed (default: every seed of the config)")


def config_of(args):
    """The experiment config of a command: --config with its --set overrides."""
    from clipit.config import load_config

    return load_config(args.config, args.set)


def source_of(args):
    """Where the config came from: what the process of each cell of a chain loads."""
    from clipit.cells import ConfigSource

    return ConfigSource(args.config, tuple(args.set))
