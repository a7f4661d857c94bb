"""Experiment grids: backbone x dataset x method x seed (x ablation) -> cells -> tasks.

A grid file (its format and loading: clipit/hpc/grid_file.py) names a base experiment config and
axes; the cartesian product of the axis values, times the methods of the resulting config, times the
seeds, gives the **cells**. A cell is exactly what `clipit train --config CFG --set ... --method M
--seed S` runs, and its full config is loaded (and so validated) when the grid is expanded.

Cells are grouped into **tasks** (one SLURM array task each). A task is a *chain*: the cells of one
axis combination and one seed, in `method_order` (the unimodal warm start before CLIP-IT), so the
warm-start dependency of Table 1 never leaves a task. An axis value may instead reuse another
value's warm start (`warm_start_from`: ablations reuse the baseline's unimodal probe). Its cells
form a task of their own; while that warm start is not trained yet, the task lists the task that
trains it in `after`, and the launcher submits it with an `afterok` dependency on that one array
task (docs/reproduce.md, "How cells become jobs").

This module only plans; clipit/hpc/submit.py submits, clipit/hpc/task.py runs a task on its node and
clipit/hpc/ledger.py tracks the cells.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from clipit import layout
from clipit.cells import ConfigSource, cell_argv
from clipit.config import ConfigError, ExperimentConfig, load_config, to_dict
from clipit.config_checks import method_order
from clipit.hpc.grid_file import AxisValue, GridConfig, load_grid
from clipit.methods import method_spec


@dataclass(frozen=True)
class Cell:
    """One (config, overrides, method, seed): one `clipit train` call and one run directory."""

    grid: str
    axes: tuple[tuple[str, str], ...]  # ((axis, value), ...) in axis order
    method: str
    kind: str  # the method's kind: a registered method (clipit/methods.py)
    seed: int
    config: str  # experiment config file (absolute)
    overrides: tuple[str, ...]
    run_dir: str  # absolute
    warm_start: str | None = None  # method trained first (same output_dir), if any
    warm_start_link: str | None = None  # another value's run dir used as this cell's warm start
    axis_labels: tuple[tuple[str, str], ...] = ()  # ((axis, report label), ...) of values that set `label`
    compare_to: tuple[tuple[str, str], ...] = ()  # ((axis, value), ...) of the values this cell's varies
    detail: str = ""  # what the cell trains, for the dry-run listing (e.g. "clipit, text tower + LoRA")

    @property
    def key(self) -> str:
        return ",".join([f"{a}={v}" for a, v in self.axes] + [f"method={self.method}", f"seed={self.seed}"])

    @property
    def labels(self) -> dict[str, str]:
        return dict(self.axes)

    def load(self) -> ExperimentConfig:
        return load_config(self.config, list(self.overrides))

    def argv(self) -> list[str]:
        """The cell's `clipit train` arguments (what its task runs)."""
        return cell_argv("train", ConfigSource(self.config, self.overrides), self.method, self.seed)

    def command(self) -> str:
        """The equivalent shell command (for logs, docs and reproducing one cell by hand)."""
        import shlex

        return shlex.join(["clipit", *self.argv()])

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["axes"] = dict(self.axes)
        d["overrides"] = list(self.overrides)
        d["axis_labels"] = dict(self.axis_labels)
        d["compare_to"] = dict(self.compare_to)
        d["key"] = self.key
        return d


@dataclass
class Task:
    """One array task: cells run in order (warm starts first) in one process (or one rank group)."""

    cells: list[Cell]
    workdir: str  # cwd of the launcher: relative data/weights paths in the configs resolve against it
    after: list[int] = field(default_factory=list)  # plan.tasks indices that train this task's warm starts

    @property
    def label(self) -> str:
        first = self.cells[0]
        return ",".join([f"{a}={v}" for a, v in first.axes] + [f"seed={first.seed}"])


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
    tasks, notes = _make_tasks(expanded, by_run_dir, check_done, workdir, where)
    cells = [c for t in tasks for c in t.cells]
    return Plan(grid=grid, grid_path=str(grid_path), root=root, cells=cells, tasks=tasks, notes=notes)


@dataclass
class _Combo:
    """One axis combination, expanded: its loaded config and one chain of cells per seed."""

    key: tuple[tuple[str, str], ...]  # ((axis, value), ...) in axis order
    config: ExperimentConfig
    chains: dict[int, list[Cell]]  # seed -> cells in method order
    link: tuple[tuple[str, str], ...] | None = None  # the combination whose warm start this one reuses


def _expand_combo(
    grid: GridConfig,
    axes: list[tuple[str, dict[str, AxisValue]]],
    combo: tuple,
    root: str,
    where: str,
    extra_overrides: list[str] | None,
) -> _Combo:
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
    return _Combo(key=combo_key, config=cfg, chains=chains, link=link)


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


def _index_run_dirs(combos: list[_Combo], axes: list, where: str) -> dict[str, Cell]:
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


def _make_tasks(
    combos: list[_Combo], by_run_dir: dict[str, Cell], check_done, workdir: str, where: str
) -> tuple[list[Task], list[str]]:
    """Tasks (chains that train their own warm starts first, then the reusing ones) and notes on waits.

    A chain that reuses another value's warm start is a task too; while that warm start is not trained,
    the task records the task that trains it (`after`), and the launcher submits it with a SLURM afterok
    dependency on that task."""
    tasks: list[Task] = []
    chain_task: dict[tuple, int] = {}  # (combo key, seed) -> index of the task that trains it
    for combo in combos:
        if combo.link is None:
            for seed, chain in combo.chains.items():
                chain_task[(combo.key, seed)] = len(tasks)
                tasks.append(Task(cells=list(chain), workdir=workdir))
    configs = {combo.key: combo.config for combo in combos}
    notes: list[str] = []
    for combo in combos:
        if combo.link is None:
            continue
        for seed, chain in combo.chains.items():
            linked, after = _link_warm_starts(
                chain,
                seed,
                configs[combo.link],
                combo.config,
                chain_task[(combo.link, seed)],
                by_run_dir,
                check_done,
                where,
            )
            tasks.append(Task(cells=linked, workdir=workdir, after=after))
            if after:
                notes.append(
                    f"{tasks[-1].label}: waits for task {after[0]} ({tasks[after[0]].label}), "
                    "which trains its warm start"
                )
    return tasks, notes


def _link_warm_starts(
    chain: list[Cell],
    seed: int,
    source: ExperimentConfig,
    cfg: ExperimentConfig,
    source_task: int,
    by_run_dir: dict[str, Cell],
    check_done,
    where: str,
) -> tuple[list[Cell], list[int]]:
    """The chain with each warm start it does not train pointed at the source value's run, and the tasks
    to wait for (`source_task` trains the source value's chain of this seed)."""
    after, linked = [], []
    for cell in chain:
        if cell.warm_start is None or any(c.method == cell.warm_start for c in chain):
            linked.append(cell)
            continue
        _check_reusable(source, cfg, cell.warm_start, f"{where}: cell {cell.key}")
        source_dir = str(layout.run_dir(source.output_dir, cell.warm_start, seed).absolute())
        source_cell = by_run_dir.get(source_dir)
        if source_cell is None:
            if not layout.is_trained(source_dir):
                raise ConfigError(
                    f"{where}: cell {cell.key} reuses the warm start {source_dir}, which this "
                    "grid does not train and which does not exist yet"
                )
        elif not check_done(source_cell) and source_task not in after:
            after.append(source_task)
        linked.append(dataclasses.replace(cell, warm_start_link=source_dir))
    return linked, after


def _check_reusable(source: ExperimentConfig, cfg: ExperimentConfig, warm: str, where: str) -> None:
    """A warm start can be shared only if everything it depends on is the same in both configs."""
    if warm not in source.methods:
        raise ConfigError(f"{where}: the reused warm start {warm!r} is not a method of the source config")

    def deps(c: ExperimentConfig) -> dict:
        # What the warm-start run reads: its own method settings, the images (the shards' images do not
        # depend on which report each image got, so shards.dir itself may differ) and the backbone.
        d = to_dict(c)
        out = {
            "methods." + warm: d["methods"][warm],
            "data": d["data"],
            "shards.samples_per_shard": d["shards"]["samples_per_shard"],
        }
        out |= {f"model.{k}": d["model"][k] for k in ("backbone", "weights", "weights_file", "image_size", "text_dim")}
        reads_reports = method_spec(c.methods[warm].method).reads_reports
        if reads_reports or c.methods[warm].finetune == "lora":
            out |= {"model.lora": d["model"]["lora"], "model.kd_layers": d["model"]["kd_layers"]}
        if reads_reports:  # text-using warm starts read the paired reports too
            out |= {"shards.dir": d["shards"]["dir"]}
        return out

    a, b = deps(source), deps(cfg)
    differ = [k for k in a if a[k] != b[k]]
    if differ:
        raise ConfigError(
            f"{where}: cannot reuse warm start {warm!r}: {differ[0]} differs from the source config; "
            "drop warm_start_from (train it here) or keep that setting equal"
        )


def cell_is_done(cell: Cell) -> bool:
    """Finished = trained and evaluated: the trainer's skip contract (clipit/layout.py)."""
    return layout.is_finished(cell.run_dir)


def cell_changes(cell: Cell) -> str:
    """How a finished cell's recorded identity (train_summary.json, metrics.json) differs from the config
    the grid asks for now ('' when equal): such a cell is *changed*, not done (clipit/identity.py)."""
    from clipit.errors import ClipitError, one_line
    from clipit.reruns import cell_changes as changes

    try:
        return changes(cell.load(), cell.method, cell.seed)[1]
    except ClipitError as err:  # an unreadable record cannot vouch for the cell either
        return one_line(err, limit=200)


def chunk(items: list, size: int) -> list[list]:
    """Split into consecutive chunks of at most `size` (an array may hold at most MaxArraySize tasks)."""
    if size < 1:
        raise ValueError(f"chunk size must be >= 1, got {size}")
    return [items[i : i + size] for i in range(0, len(items), size)]
