"""What the command line asks of the HPC layer, as typed requests: the CLI builds them from its flags
(the clipit/cli*.py modules alone read command-line flags), submit.py and prepare.py act on them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class GridRequest:
    """`clipit grid`: plan a grid file, then print it (dry run), run it here (local) or submit it."""

    grid: str  # the grid file (configs/grids/*.yaml)
    overrides: tuple[str, ...] = ()  # --set, applied to every cell
    root: str | None = None  # replaces the grid's root folder
    profile: str | None = None  # default: the grid's own
    dry_run: bool = False
    local: bool = False
    wait: bool = False
    force_unknown: bool = False  # resubmit cells whose job state cannot be checked
    preflight: bool = True  # refuse to submit when shards or weights are missing
    throughput: str | None = None  # measured throughput for the dry run's cost


@dataclass(frozen=True)
class GridQuery:
    """`clipit grid status|cancel`: the cells of a grid file (with the same --set and --root it was submitted with)."""

    grid: str
    overrides: tuple[str, ...] = ()
    root: str | None = None


@dataclass(frozen=True)
class PrepareRequest:
    """`clipit prepare pair|shards`: pairing and shard building as job arrays, for a grid or one config."""

    stage: Literal["pair", "shards"]
    grid: str | None = None  # exactly one of grid and config
    config: str | None = None
    overrides: tuple[str, ...] = ()
    root: str | None = None  # with grid: replaces the grid's root folder, as `clipit grid --root`
    profile: str | None = None  # default: the grid's, else local-cluster
    dry_run: bool = False
    local: bool = False
    wait: bool = False
    resources: dict[str, Any] = field(default_factory=dict)  # profile fields for these jobs
    num_parts: int = 16  # shards: array tasks per shard directory
    pair: bool = False  # shards: submit the pairing first; parts wait for it
    pair_resources: dict[str, Any] = field(default_factory=dict)  # profile fields for the pairing jobs
    preflight: bool = True  # refuse to submit when an input or the pairing model is missing


@dataclass(frozen=True)
class ReproduceRequest:
    """`clipit reproduce`: doctor, pairing and shards, the grids, the report, chained (clipit/hpc/reproduce.py)."""

    grids: tuple[str, ...]  # grid files, in the order their stage runs
    overrides: tuple[str, ...] = ()  # --set, applied to every cell of every grid
    root: str | None = None  # replaces each grid's root folder
    profile: str | None = None  # default: the first grid's
    dry_run: bool = False
    local: bool = False
    preflight: bool = True  # stage 1 (the doctor's checks) and each grid's pre-flight
    frozen: bool = True  # stage 4: k-NN and few-shot of each Table 1 backbone (clipit/hpc/frozen_stage.py)
    num_parts: int = 16  # shard parts per shard directory
    resources: dict[str, Any] = field(default_factory=dict)  # profile fields for the shard jobs
    pair_resources: dict[str, Any] = field(default_factory=dict)  # profile fields for the pairing jobs
    throughput: str | None = None  # measured throughput for the dry run's cost
    stage: Literal["all", "grids"] = "all"  # grids: stages 3 to 5 only (what the chain's stage job runs)
