"""Cluster profiles: where and with what resources SLURM (or submitit's local executor) runs tasks.

A profile is a YAML file of `ClusterProfile` fields. The shipped ones are package data in
clipit/hpc/profiles/ (`slurm/profiles` links there), so a non-editable install has them; a site
keeps its own in ./slurm/profiles/ under the working directory, which wins over a shipped one of the
same name. A path to a YAML file works too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from clipit.config import ConfigError, Count, Positive, PositiveFloat
from clipit.typed_yaml import from_dict, read_yaml

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"  # shipped profiles: package data
SITE_PROFILE_DIR = Path("slurm") / "profiles"  # a site's own profiles, under the working directory


@dataclass
class ClusterProfile:
    """Where and with what resources the tasks run."""

    executor: Literal["slurm", "local"] = "slurm"  # local: submitit's local executor (also `--local`)
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    nodes: Positive = 1
    tasks_per_node: Positive = 1  # > 1: one task per GPU; rank env from SLURM (TorchDistributedEnvironment)
    gpus_per_node: Count = 0
    cpus_per_task: Positive = 4
    mem_gb: PositiveFloat = 16.0
    timeout_min: Positive = 60
    array_parallelism: Positive = 64  # at most this many tasks of one array run at once (--array=...%N)
    max_array_size: Count = 0  # tasks per array; 0 = ask the cluster (scontrol: MaxArraySize)
    signal_delay_s: Count = 120  # USR2 this long before the time limit: checkpoint and requeue
    max_num_timeout: Count = 20  # requeues after a timeout before submitit gives up on a task
    setup: list[str] = field(default_factory=list)  # shell lines before the task (module load, venv ...)
    additional: dict[str, Any] = field(default_factory=dict)  # extra #SBATCH options, e.g. {exclude: node1}
    python: str | None = None  # interpreter of the jobs; default: the launcher's


def profile_path(name: str) -> Path:
    """`NAME` -> ./slurm/profiles/NAME.yaml (a site's own), else the shipped clipit/hpc/profiles/NAME.yaml;
    paths pass through."""
    if name.endswith((".yaml", ".yml")) or os.sep in name:
        return Path(name)
    for folder in (SITE_PROFILE_DIR, PROFILE_DIR):
        if (folder / f"{name}.yaml").exists():
            return folder / f"{name}.yaml"
    return PROFILE_DIR / f"{name}.yaml"


def load_profile(name: str, resources: dict[str, Any] | None = None) -> ClusterProfile:
    path = profile_path(name)
    if not path.is_file():
        known = sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))
        raise ConfigError(f"{path}: cluster profile not found; use one of {known} or a path to a profile YAML")
    raw = read_yaml(path, "cluster profile")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a profile is a mapping of settings")
    raw.update(resources or {})
    return from_dict(ClusterProfile, raw, f"{path} (+ grid resources)" if resources else str(path))
