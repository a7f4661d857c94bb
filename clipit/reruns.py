"""Which training cells of a config a rerun runs: a finished cell made under this config is reused as it
is, one made under another config is named (clipit/identity.py); `clipit demo`, `clipit train
--overwrite` and the grid's cell status ask here (docs/reliability.md, "Reruns")."""

from __future__ import annotations

from pathlib import Path

from clipit import layout
from clipit.cells import ChainCell
from clipit.config import ExperimentConfig
from clipit.errors import ClipitError
from clipit.io import read_json


def stale_run_changes(cfg: ExperimentConfig, method: str, seed: int) -> str:
    """How the cell's finished run (or resume checkpoint) differs from the config's identity ('' if current
    or absent): what `--overwrite` replaces and what `clipit demo` checks before it starts the cells."""
    from clipit.training.run_identity import stale_run_changes as changes

    run_dir = layout.run_dir(cfg.output_dir, method, seed)
    warm = cfg.methods[method].warm_start
    warm_start = layout.warm_start(run_dir, warm) if warm else None
    return changes(cfg, method, seed, run_dir, warm_start)


def cell_changes(cfg: ExperimentConfig, method: str, seed: int) -> tuple[Path, str]:
    """(the file that records it, how it differs) for a finished cell made under another config than `cfg`:
    its training (train_summary.json), else its test evaluation (metrics.json); '' when current."""
    from clipit.shards.manifest import load_manifest
    from clipit.training.run_identity import evaluated_changes

    run_dir = layout.run_dir(cfg.output_dir, method, seed)
    changes = stale_run_changes(cfg, method, seed)
    if changes:
        return layout.train_summary(run_dir), changes
    try:
        manifest = load_manifest(cfg.shards.dir)
    except ClipitError:
        manifest = None
    metrics = layout.metrics_file(run_dir)
    return metrics, evaluated_changes(read_json(metrics), manifest, "test")


def cells_to_run(cfg: ExperimentConfig, cells: list[ChainCell], overwrite: bool = False) -> list[ChainCell]:
    """The training cells with work left, before any process starts: a finished cell made under this config
    is reused as it is (no process); one made under another config stops `clipit demo` with one line naming
    the changed keys, or with `overwrite` runs (its process replaces it), as does every cell that warm-starts
    from a cell that runs."""
    from clipit.identity import OVERWRITE, changed_output

    todo, running = [], set()
    for cell in cells:
        method, _, seed = cell.label.partition(" seed ")
        run_dir = layout.run_dir(cfg.output_dir, method, int(seed))
        if layout.is_finished(run_dir) and not running.intersection(cell.needs):
            where, changes = cell_changes(cfg, method, int(seed))
            if not changes:
                continue
            if not overwrite:
                raise changed_output(
                    where,
                    f"{cell.label} finished",
                    changes,
                    "set output_dir to a new folder",
                    f"rerun `clipit demo` with `{OVERWRITE}`",
                )
        todo.append(cell)
        running.add(cell.label)
    return todo
