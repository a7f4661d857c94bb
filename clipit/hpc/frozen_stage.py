"""The frozen-feature stage of `clipit reproduce` (clipit/hpc/reproduce.py): `clipit evaluate --frozen`
(k-NN and SimpleShot, clipit/evaluation/frozen.py) on the backbone of every Table 1 cell that has one,
between the grids and the report, so that the report's k-NN / few-shot table comes out of the chain.

Which cells: the main runs (no ablation or variant) of the paper's pair, the linear probe (the pretrained
backbone) and the proposed method (the backbone CLIP-IT leaves), as registered by their `role`
(clipit/methods.py). Each is one job of its own process. A cell that did not finish (it failed, or its
grid was refused) is skipped with a line naming it, not failed: the report already names that cell. A
cell whose frozen_eval.json matches its training is skipped, so rerunning resumes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from clipit.cells import ConfigSource, cell_argv
from clipit.evaluation.frozen_record import is_current
from clipit.hpc.cluster import ClusterProfile, load_profile
from clipit.hpc.executor import wait_for_jobs
from clipit.hpc.grid import Plan
from clipit.hpc.grid_cell import Cell, cell_changes, cell_is_done
from clipit.hpc.prepare import StageCall, run_jobs
from clipit.methods import role_method
from clipit.results.runs import variant_name

FROZEN_ROLES = ("probe", "proposed")  # Table 1's pair: the backbones the frozen-feature table compares


@dataclass(frozen=True)
class FrozenJob:
    """`clipit evaluate --config C --set ... --method M --seed S --frozen` for one grid cell."""

    cell: Cell

    def argv(self) -> list[str]:
        source = ConfigSource(self.cell.config, self.cell.overrides)
        return cell_argv("evaluate", source, self.cell.method, self.cell.seed, "--frozen")


class FrozenCall(StageCall):
    """Runs a FrozenJob when its cell finished; a cell that did not is named and skipped."""

    def __call__(self, job: FrozenJob) -> str:
        if not cell_is_done(job.cell):
            print(f"[clipit reproduce] {job.cell.key}: not finished (failed or not run); no frozen evaluation")
            return "skipped (cell not finished)"
        if is_current(Path(job.cell.run_dir)):
            print(f"[clipit reproduce] {job.cell.key}: frozen_eval.json scores its current training already")
            return "skipped (scored already)"
        return super().__call__(job)


def frozen_cells(plans: list[Plan]) -> list[Cell]:
    """The main-run cells of Table 1's pair (probe and proposed method), in plan order, one per run dir."""
    kinds = {role_method(role) for role in FROZEN_ROLES} - {""}
    found: dict[str, Cell] = {}
    for plan in plans:
        for cell in plan.cells:
            other_axes = {a: v for a, v in cell.axes if a not in ("backbone", "dataset", "clip")}
            if cell.kind in kinds and variant_name(other_axes) == "":
                found.setdefault(os.path.realpath(cell.run_dir), cell)
    return list(found.values())


def pending(cells: list[Cell]) -> list[Cell]:
    """Cells whose frozen evaluation is not written for their current training, or that the grid is about
    to train again (made under another config: under SLURM the jobs are queued before the cells run)."""
    return [c for c in cells if not is_current(Path(c.run_dir)) or cell_changes(c)]


def frozen_profile(plan: Plan, profile_name: str) -> ClusterProfile:
    """One process per job (the cell's own GPU count capped at one; its time limit and account)."""
    profile = load_profile(profile_name, plan.grid.resources)
    return replace(profile, nodes=1, tasks_per_node=1, gpus_per_node=min(1, profile.gpus_per_node))


def submit_frozen(
    plans: list[Plan], profile_name: str, cluster: str, folder: Path, dependency: str | None = None
) -> tuple[list, int]:
    """Queue (SLURM, after `dependency`) or run here in order (local) the pending frozen evaluations of
    every plan's Table 1 cells. Returns (the submitted jobs, how many failed: local runs only)."""
    jobs, failed, seen, work = [], 0, set(), []
    for plan in plans:  # a run folder two grids name is evaluated once, with the first grid's resources
        cells = [c for c in frozen_cells([plan]) if os.path.realpath(c.run_dir) not in seen]
        seen.update(os.path.realpath(c.run_dir) for c in cells)
        work.append((plan, pending(cells)))
    if not any(todo for _, todo in work):
        print(f"stage 4 frozen features: all {len(seen)} cell(s) scored for their current training; skipped")
        return jobs, failed
    for plan, todo in work:
        if not todo:
            continue
        profile, call = frozen_profile(plan, profile_name), FrozenCall(os.getcwd())
        print(f"stage 4 frozen features: {len(todo)} cell(s) of {plan.grid.name}")
        if cluster == "slurm":
            jobs += run_jobs(
                profile,
                cluster,
                folder,
                "clipit-frozen",
                [FrozenJob(c) for c in todo],
                [c.key for c in todo],
                dependency=dependency,
                call=call,
            )
            continue
        for cell in todo:  # one at a time: each encodes a whole split
            handles = run_jobs(profile, cluster, folder, "clipit-frozen", [FrozenJob(cell)], [cell.key], call=call)
            failed += wait_for_jobs(handles)
            jobs += handles
    return jobs, failed
