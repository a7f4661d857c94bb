"""Grid files (configs/grids/*.yaml): their schema and loading, validated at load.

A grid file names one base experiment config and a set of *axes*. Each axis value contributes
`--set`-style overrides; the cartesian product of the axis values, times the methods of the resulting
config, times the seeds, gives the cells (clipit/hpc/grid.py expands them). An axis value may reuse
another value's warm start (`warm_start_from`: ablations reuse the baseline's unimodal probe).

    name: demo
    base: ../demo-tiny.yaml                # experiment config, relative to this file's folder
    root: runs/grids/{name}                # {root} in templates; made absolute when expanded
    profile: local                         # a cluster profile (clipit/hpc/cluster.py)
    seeds: [0, 1]
    methods: [unimodal, clipit]            # default: every method of the base config
    set: {output_dir: "{root}/{backbone}"} # overrides for every cell; {axis} = the value's name
    axes:
      backbone:
        tiny: {set: {model.backbone: demo-vit-tiny}}
      ablation:
        full: {}
        no-lora: {set: {model.lora.enabled: false}, methods: [clipit], warm_start_from: full}
    resources: {timeout_min: 30}           # overrides of the profile's fields for this grid

Config files named in a grid file (base, a value's config, a profile file) are relative to the grid
file's folder and are made absolute here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipit.config import ConfigError
from clipit.layout import check_name
from clipit.typed_yaml import expand_path, from_dict, read_yaml


@dataclass
class AxisValue:
    set: dict[str, Any] = field(default_factory=dict)  # dotted key -> value ({root}/{axis} templates allowed)
    config: str | None = None  # replaces the grid's base experiment config for this value
    methods: list[str] | None = None  # only these methods for this value (default: the grid's)
    warm_start_from: str | None = None  # value of the same axis whose warm-start runs these cells reuse
    label: str | None = None  # the row label in `clipit report` (default: the value's name)
    compare_to: str | None = None  # value of the same axis this one varies: its report delta is taken against it


@dataclass
class GridConfig:
    name: str
    base: str  # experiment config every cell starts from
    root: str = "runs/grids/{name}"
    profile: str = "local"
    seeds: list[int] = field(default_factory=lambda: [0])
    methods: list[str] | None = None
    set: dict[str, Any] = field(default_factory=dict)
    axes: dict[str, dict[str, AxisValue]] = field(default_factory=dict)
    resources: dict[str, Any] = field(default_factory=dict)


def is_grid_file(path: str | Path) -> bool:
    """A grid file names a `base` experiment config (experiment configs have no such key)."""
    raw = read_yaml(Path(path), "config file")
    return isinstance(raw, dict) and "base" in raw


def load_grid(path: str | Path) -> GridConfig:
    path = Path(path)
    raw = read_yaml(path, "grid file")
    for key in ("name", "base"):
        if key not in (raw if isinstance(raw, dict) else {}):
            raise ConfigError(f"{path}: grid needs a {key!r} key")
    # An axis value written as `~` or `{}` means "no overrides".
    for axis, values in (raw.get("axes") or {}).items():
        if isinstance(values, dict):
            raw["axes"][axis] = {str(k): ({} if v is None else v) for k, v in values.items()}
        elif isinstance(values, list):  # shorthand: a list of names without overrides
            raw["axes"][axis] = {str(k): {} for k in values}
    grid = from_dict(GridConfig, raw, str(path))
    grid.root = expand_path(grid.root, "root", str(path), path.parent.absolute())  # ${SCRATCH}/clipit, ...
    grid.base = config_file_path(grid.base, "base", path)
    if grid.profile.endswith((".yaml", ".yml")) or "/" in grid.profile:  # a profile file, not a name
        grid.profile = config_file_path(grid.profile, "profile", path, "cluster profile")
    for axis, values in grid.axes.items():
        for name, value in values.items():
            if value.config is not None:
                value.config = config_file_path(value.config, f"axes.{axis}.{name}.config", path)
    for axis, values in grid.axes.items():
        if not values:
            raise ConfigError(f"{path}: axis {axis!r} has no values")
        for name, value in values.items():
            if value.warm_start_from is not None and value.warm_start_from not in values:
                raise ConfigError(
                    f"{path}: axes.{axis}.{name}.warm_start_from = {value.warm_start_from!r} "
                    f"is not a value of axis {axis!r} ({sorted(values)})"
                )
            if value.compare_to is not None and value.compare_to not in values:
                raise ConfigError(
                    f"{path}: axes.{axis}.{name}.compare_to = {value.compare_to!r} is not a value of "
                    f"axis {axis!r} ({sorted(values)})"
                )
            if value.warm_start_from == name:
                raise ConfigError(f"{path}: axes.{axis}.{name} cannot reuse its own warm start")
            if value.warm_start_from is not None and values[value.warm_start_from].warm_start_from is not None:
                raise ConfigError(
                    f"{path}: axes.{axis}.{name}.warm_start_from names {value.warm_start_from!r}, "
                    "which itself reuses a warm start; point it at the value that trains it"
                )
    check_name(grid.name, f"{path}: name: the grid name")  # names are templated into output paths
    for axis, values in grid.axes.items():
        check_name(axis, f"{path}: axes: axis name")
        for name in values:
            check_name(name, f"{path}: axes.{axis}: value name")
    reserved = {"root", "name"} & set(grid.axes)
    if reserved:
        raise ConfigError(f"{path}: axis name {sorted(reserved)[0]!r} is reserved for templates; rename it")
    if not grid.seeds:
        raise ConfigError(f"{path}: seeds must list at least one seed")
    return grid


def config_file_path(value: str, key: str, grid_path: Path, what: str = "experiment config") -> str:
    """A config file named in a grid file, absolute: a relative path belongs to the grid file's folder
    (as an include does), so the grid works from any working directory."""
    expanded = Path(expand_path(value, key, str(grid_path), grid_path.parent.absolute()))
    resolved = expanded if expanded.is_absolute() else grid_path.parent.absolute() / expanded
    if not resolved.is_file():
        moved = ""
        if not expanded.is_absolute() and expanded.is_file():  # written relative to the working directory
            moved = f"; relative paths are relative to the grid file's folder: write {key}: " + os.path.relpath(
                expanded.absolute(), grid_path.parent.absolute()
            )
        raise ConfigError(f"{grid_path}: {key} = {value!r}: {what} {resolved} not found{moved}")
    return str(Path(os.path.normpath(resolved)))
