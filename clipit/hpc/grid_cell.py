"""One cell of an expanded grid (clipit/hpc/grid.py): one `clipit train` call and one run directory, and
whether it is done or changed since it ran.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from clipit import layout
from clipit.cells import ConfigSource, cell_argv
from clipit.config import ExperimentConfig, load_config


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
