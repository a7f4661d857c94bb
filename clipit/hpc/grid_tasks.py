"""Cells -> tasks: how an expanded grid's cells (clipit/hpc/grid.py) become SLURM array tasks.

A task is a *chain*: the cells of one axis combination and one seed, in `method_order` (the unimodal
warm start before CLIP-IT), so the warm-start dependency of Table 1 never leaves a task. An axis value
may instead reuse another value's warm start (`warm_start_from`: ablations reuse the baseline's
unimodal probe). Its cells form a task of their own; while that warm start is not trained yet, the
task lists the task that trains it in `after`, and the launcher submits it with an `afterok`
dependency on that one array task (docs/reproduce.md, "How cells become jobs").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from clipit import layout
from clipit.config import ConfigError, ExperimentConfig, to_dict
from clipit.hpc.grid_cell import Cell
from clipit.methods import method_spec


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
class Combo:
    """One axis combination, expanded: its loaded config and one chain of cells per seed."""

    key: tuple[tuple[str, str], ...]  # ((axis, value), ...) in axis order
    config: ExperimentConfig
    chains: dict[int, list[Cell]]  # seed -> cells in method order
    link: tuple[tuple[str, str], ...] | None = None  # the combination whose warm start this one reuses


def make_tasks(
    combos: list[Combo], by_run_dir: dict[str, Cell], check_done, workdir: str, where: str
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


def chunk(items: list, size: int) -> list[list]:
    """Split into consecutive chunks of at most `size` (an array may hold at most MaxArraySize tasks)."""
    if size < 1:
        raise ValueError(f"chunk size must be >= 1, got {size}")
    return [items[i : i + size] for i in range(0, len(items), size)]
