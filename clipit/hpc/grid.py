"""Experiment grids: backbone x dataset x method x seed (x ablation) -> cells -> tasks.

A grid file (its format and loading: clipit/hpc/grid_file.py) names a base experiment config and
axes; the cartesian product of the axis values, times the methods of the resulting config, times the
seeds, gives the **cells** (clipit/hpc/grid_cell.py). A cell is exactly what `clipit train --config CFG
--set ... --method M --seed S` runs, and its full config is loaded (and so validated) when the grid is
expanded. The cells are then grouped into **tasks**, one SLURM array task each (clipit/hpc/grid_tasks.py:
chains, reused warm starts and the `afterok` waits they need).

This module only plans; clipit/hpc/submit.py submits, clipit/hpc/task.py runs a task on its node and
clipit/hpc/ledger.py tracks the cells.
"""

from __future__ import annotations

import itertools
import os
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from clipit import layout
from clipit.config import ConfigError, ExperimentConfig, load_config
from clipit.config_checks import method_order
from clipit.hpc.grid_cell import Cell, cell_is_done
from clipit.hpc.grid_file import AxisValue, GridConfig, load_grid
from clipit.hpc.grid_tasks import Combo, Task, make_tasks
from clipit.methods import method_spec


@dataclass
class Plan:
    grid: GridConfig
    grid_path: str
    root: str
    cells: list[Cell]
    tasks: list[Task]
    notes: list[str] = field(default_factory=list)


def format_override(key: str, value: Any) -> str:
    """`key=value` in the form `load_config` parses back (YAML flow style, one line)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9, sort_keys=False).strip()
    if text.endswith("\n..."):
        text = text[: -len("\n...")]
    elif text.endswith("..."):  # yaml's document end marker after plain scalars
        text = text[:-3].rstrip()
    return f"{key}={text}"


def _template(value: Any, names: dict[str, str], where: str) -> Any:
    if isinstance(value, str):
        fields = [f for _, f, _, _ in string.Formatter().parse(value) if f is not None]
        missing = sorted({f for f in fields if f not in names})
        if missing:
            raise ConfigError(
                f"{where}: unknown template field {{{missing[0]}}} in {value!r}; available: {sorted(names)}"
            )
        return value.format_map(names) if fields else value
    if isinstance(value, list):
        return [_template(v, names, where) for v in value]
    if isinstance(value, dict):
        return {k: _template(v, names, where) for k, v in value.items()}
    return value


def expand(
    grid_path: str | Path, extra_overrides: list[str] | None = None, check_done=None, root: str | None = None
) -> Plan:
    """Expand a grid file into cells and tasks; every cell's config is loaded (errors name the cell).

    `check_done(cell) -> bool` says whether a warm start is already trained (default: its
    train_summary.json and metrics.json exist), which decides whether a reusing value gets its own
    task or joins the chain that trains the warm start.
    """
    grid_path = Path(grid_path)
    grid = load_grid(grid_path)
    check_done = check_done or cell_is_done
    workdir = os.getcwd()
    root = str(Path((root or grid.root).format_map({"name": grid.name})).absolute())
    where = str(grid_path)
    axes = list(grid.axes.items())
    combos = list(itertools.product(*[list(values.items()) for _, values in axes])) if axes else [()]
    expanded = [_expand_combo(grid, axes, combo, root, where, extra_overrides) for combo in combos]
    by_run_dir = _index_run_dirs(expanded, axes, where)
    tasks, notes = make_tasks(expanded, by_run_dir, check_done, workdir, where)
    cells = [c for t in tasks for c in t.cells]
    return Plan(grid=grid, grid_path=str(grid_path), root=root, cells=cells, tasks=tasks, notes=notes)


def _expand_combo(
    grid: GridConfig,
    axes: list[tuple[str, dict[str, AxisValue]]],
    combo: tuple,
    root: str,
    where: str,
    extra_overrides: list[str] | None,
) -> Combo:
    """Overrides, config and methods of one axis combination; its config is loaded and its method chain checked."""
    combo_key = tuple((axis, value_name) for (axis, _), (value_name, _) in zip(axes, combo))
    names = {"name": grid.name, "root": root} | dict(combo_key)
    label = ",".join(f"{a}={v}" for a, v in combo_key) or grid.name
    overrides = [format_override(k, v) for k, v in _template(grid.set, names, where).items()]
    overrides.append(format_override("seeds", list(grid.seeds)))
    config, methods, link = grid.base, grid.methods, None
    for (axis, _), (value_name, value) in zip(axes, combo):
        overrides += [
            format_override(k, v) for k, v in _template(value.set, names, f"{where}: axes.{axis}.{value_name}").items()
        ]
        config = value.config or config
        if value.methods is not None:
            methods = value.methods
        if value.warm_start_from is not None:
            if link is not None:
                raise ConfigError(f"{where}: cell {label}: only one axis value may set warm_start_from")
            link = tuple((a, value.warm_start_from if a == axis else v) for a, v in combo_key)
    overrides += list(extra_overrides or [])
    config_path = str(Path(config).absolute())
    try:
        cfg = load_config(config_path, overrides)
    except ConfigError as err:
        raise ConfigError(f"{where}: cell {label}: {err}") from None
    order = method_order(cfg)
    unknown = [m for m in (methods or []) if m not in cfg.methods]
    if unknown:
        raise ConfigError(
            f"{where}: cell {label}: method {unknown[0]!r} is not in {config} (methods: {sorted(cfg.methods)})"
        )
    chosen = [m for m in order if methods is None or m in methods]
    if not chosen:
        raise ConfigError(f"{where}: cell {label}: no methods to run")
    for m in chosen:
        warm = cfg.methods[m].warm_start
        if warm and warm not in chosen and link is None:
            raise ConfigError(
                f"{where}: cell {label}: method {m!r} warm-starts from {warm!r}; add {warm!r} "
                "to methods, or set warm_start_from to a value that trains it"
            )
    axis_labels = tuple((axis, value.label) for (axis, _), (_, value) in zip(axes, combo) if value.label)
    compare_to = tuple((axis, value.compare_to) for (axis, _), (_, value) in zip(axes, combo) if value.compare_to)
    chains = {
        seed: [
            Cell(
                grid=grid.name,
                axes=combo_key,
                method=m,
                kind=cfg.methods[m].method,
                seed=seed,
                config=config_path,
                overrides=tuple(overrides),
                axis_labels=axis_labels,
                compare_to=compare_to,
                detail=describe_method(cfg, m),
                run_dir=str(layout.run_dir(cfg.output_dir, m, seed).absolute()),
                warm_start=cfg.methods[m].warm_start,
            )
            for m in chosen
        ]
        for seed in grid.seeds
    }
    return Combo(key=combo_key, config=cfg, chains=chains, link=link)


def describe_method(cfg: ExperimentConfig, method: str) -> str:
    """A method's kind, fine-tuning and text side in a few words (dry-run listings)."""
    m = cfg.methods[method]
    spec = method_spec(m.method)
    if spec.vision is None:
        return f"{m.method} ({spec.description or spec.label})"
    parts = [m.method, spec.finetune(m.finetune, cfg.model.lora.enabled)]
    if spec.text_tower and m.text_encoder == "tower":
        parts.append("text tower")
    elif spec.text_tower and not spec.text_at_test:  # CLIP-IT's distillation target from the shards
        parts.append("cached teacher")
    return ", ".join(parts)


def _index_run_dirs(combos: list[Combo], axes: list, where: str) -> dict[str, Cell]:
    """run_dir -> cell; two cells sharing a run directory would overwrite each other's run."""
    by_run_dir: dict[str, Cell] = {}
    for combo in combos:
        for chain in combo.chains.values():
            for cell in chain:
                if cell.run_dir in by_run_dir:
                    hint = f' (e.g. output_dir: "{{root}}/{"/".join("{" + a + "}" for a, _ in axes)}")' if axes else ""
                    raise ConfigError(
                        f"{where}: cells {by_run_dir[cell.run_dir].key} and {cell.key} write the same "
                        f"run directory {cell.run_dir}; make output_dir depend on every axis{hint}"
                    )
                by_run_dir[cell.run_dir] = cell
    return by_run_dir
