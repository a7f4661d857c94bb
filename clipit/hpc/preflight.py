"""Checks before anything is queued: `clipit doctor`'s checks (clipit/doctor.py) over every distinct
config a grid or a prepare run is about to submit, so a missing data folder, corpus, pairing model
(CONCH), backbone weight or warm start stops the submission here, with the doctor's lines, instead
of failing every job on its node.

Each stage runs the doctor groups its jobs need:

    pair, shards   input paths, inputs (dataset, corpus, pairing texts), weights file, pairing model
    train (grid)   weights file, methods (warm starts, imported probes), backbone, pairing model, shards
    all            every group (`clipit doctor GRID`)
    chain          every group but shards (`clipit reproduce`, whose prepare stage builds them)

A group runs once per distinct value of the settings it reads (the paper grid's 18 cell configs
load 6 backbones and one pairing model, and read 3 datasets), and each line is printed once.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from clipit import doctor
from clipit.config import ConfigError, ExperimentConfig, to_dict
from clipit.doctor import FAIL, WARN, Check
from clipit.methods import method_spec
from clipit.shards.manifest import MANIFEST

INPUTS = ("input paths", "inputs", "weights file", "pairing model")
STAGES = {
    "pair": INPUTS,
    "shards": INPUTS,
    "train": ("weights file", "methods", "backbone", "pairing model", "shards"),
    "all": ("input paths", "inputs", "weights file", "methods", "backbone", "pairing model", "shards"),
    # `clipit reproduce` before its prepare stage: everything but the shards it is about to build
    "chain": ("input paths", "inputs", "weights file", "methods", "backbone", "pairing model"),
}


class PreflightError(ConfigError):
    """A submission refused: the pre-flight checks found problems (listed on stdout)."""


@dataclass(frozen=True)
class Hints:
    """The commands a pre-flight line may advise, spelled with the caller's grid, --root and --set."""

    grid: str | None = None
    root: str | None = None
    overrides: tuple[str, ...] = ()

    def command(self, *words: str) -> str:
        args = ["clipit", *words]
        if self.grid:
            args += ["--grid" if words[0] == "prepare" else "--config", self.grid]
        if self.root:
            args += ["--root", self.root]
        for item in self.overrides:
            args += ["--set", item]
        return shlex.join(args)


def _key(d: dict, *keys: str, extra=()) -> str:
    def get(key):
        node = d
        for part in key.split("."):
            node = node[part]
        return node

    return json.dumps([[get(k) for k in keys], list(extra)], sort_keys=True, default=str)


def _groups(cfg: ExperimentConfig, stage: str, hints: Hints) -> dict[str, tuple[str, Callable[[], list[Check]]]]:
    """group name -> (memo key: the settings it reads, the checks)."""
    d = to_dict(cfg)
    shard_checks, built = doctor.check_shards(cfg)
    if stage in ("train", "all") and not built:  # grid tasks only read shards: building them is prepare's job
        manifest = Path(cfg.shards.dir) / MANIFEST
        shard_checks = [
            Check(FAIL, "shards", f"{manifest}: not built; run `{hints.command('prepare', 'shards')}` first")
        ]
    # prepare builds what the pairing model makes, so it is required there even for tower-less methods
    needs_pairing = stage in ("pair", "shards", "chain")
    towers = sorted(m for m, t in cfg.methods.items() if t.text_encoder == "tower")
    vision = sorted(m for m, t in cfg.methods.items() if method_spec(t.method).vision is not None)
    return {
        "input paths": (
            _key(d, "data", "reports", "pairing.model", "pairing.checkpoint"),
            lambda: doctor.check_paths(cfg),
        ),
        "inputs": (_key(d, "data", "reports", "pairing"), lambda: doctor.check_inputs(cfg)),
        "weights file": (_key(d, "model.weights_file"), lambda: doctor.check_weights_file(cfg)),
        "methods": (_key(d, "methods", "model.lora.enabled"), lambda: doctor.check_methods(cfg)),
        "backbone": (_key(d, "model", extra=vision), lambda: doctor.check_backbone(cfg) + hub_warning(cfg, vision)),
        "pairing model": (
            _key(d, "pairing.model", "pairing.checkpoint", "model.weights_file", "model.text_dim", extra=towers)
            + str(built and not needs_pairing),
            lambda: doctor.check_pairing(cfg, shards_built=built and not needs_pairing),
        ),
        "shards": (_key(d, "shards.dir", "model.text_dim") + str(built), lambda: shard_checks),
    }


def hub_warning(cfg: ExperimentConfig, users: list[str]) -> list[Check]:
    """Offline compute nodes cannot download what the login node could."""
    if not users:
        return []
    from clipit.models.backbones import resolve_weights

    try:
        source = resolve_weights(cfg.model.backbone, cfg.model.weights, cfg.model.weights_file)
    except Exception:  # the backbone check's own line says why
        return []
    if source.kind != "hub":
        return []
    return [
        Check(
            WARN,
            f"backbone {cfg.model.backbone}",
            f"weights come from {source.location}: offline compute nodes need a weights file (docs/reproduce.md)",
        )
    ]


def run_checks(
    configs: Iterable[ExperimentConfig], stage: str, hints: Hints = Hints(), echo: Callable[[str], None] = print
) -> list[Check]:
    """The stage's doctor groups over `configs`, each once per distinct input; prints each new line and
    returns every distinct check."""
    seen_keys: set[tuple[str, str]] = set()
    seen_lines: dict[str, Check] = {}
    for cfg in configs:
        for name, (key, group) in _groups(cfg, stage, hints).items():
            if name not in STAGES[stage] or (name, key) in seen_keys:
                continue
            seen_keys.add((name, key))
            for check in group():
                if check.line() not in seen_lines:
                    seen_lines[check.line()] = check
                    echo(check.line())
    return list(seen_lines.values())


def refuse_on_problems(checks: list[Check], what: str, skip_flag: str = "--no-preflight") -> None:
    """Raise the refusal (exit 2) when any check failed: its first ✗ line, the count of the others."""
    failed = [c for c in checks if c.status == FAIL]
    if not failed:
        return
    more = f" (and {len(failed) - 1} more ✗ line(s) above)" if len(failed) > 1 else ""
    raise PreflightError(
        f"pre-flight: {failed[0].what}: {failed[0].detail}{more}; fix them before {what} (or {skip_flag})"
    )


def load_distinct(sources: Iterable[tuple[str, tuple[str, ...]]]) -> list[ExperimentConfig]:
    """Each distinct (config file, overrides) loaded once (a grid's cells of one axis combination share theirs)."""
    from clipit.config import load_config

    return [load_config(path, list(overrides)) for path, overrides in dict.fromkeys(sources)]


def doctor_grid(query, echo: Callable[[str], None] = print) -> int:
    """`clipit doctor GRID`: every doctor check over every distinct config of the grid's cells."""
    import sys

    from clipit.hpc.grid import expand

    plan = expand(query.grid, list(query.overrides), root=query.root)
    configs = load_distinct((c.config, c.overrides) for c in plan.cells)
    echo(f"grid {plan.grid.name}: {len(plan.cells)} cells, {len(configs)} distinct config(s); root {plan.root}")
    checks = run_checks(configs, "all", Hints(query.grid, query.root, query.overrides), echo)
    failed = sum(c.status == FAIL for c in checks)
    if failed:
        print(f"clipit doctor: {failed} problem(s); fix the ✗ lines above", file=sys.stderr)
        return 2
    echo("all checks passed")
    return 0
