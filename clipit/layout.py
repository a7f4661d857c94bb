"""The run-directory layout: the one module that builds and parses run paths. Everyone asks it.

An experiment config's `output_dir` holds one directory per trained (method, seed) cell:

    <output_dir>/runs/<method>/seed-<n>/
        config.yaml               the fully resolved config the run was trained with
        best.safetensors|.json    the checkpoint selected on validation (+ sidecar: how to rebuild)
        checkpoints/latest/       resume state; a rerun continues from it
        train.log                 plain progress lines of every training attempt (appended, rank 0)
        train_summary.json        written last by training: the run is trained
        provenance.json           what the run ran on: commit, versions, device, hashes (clipit/provenance.py)
        metrics.json              written last by evaluation: the run is evaluated
        predictions-<split>.npz   keys, labels, logits (the Omega analysis)
        state.json                the grid ledger's cell state (grid runs only)

TensorBoard events live apart, under one root per output_dir, so that `tensorboard --logdir
<output_dir>/tb` names each run `<method>/seed-<n>` (and scans no checkpoints):

    <output_dir>/tb/<method>/seed-<n>/events.out.tfevents.*

W&B's local run files (logging.trackers: wandb, unless WANDB_DIR is set) go to <output_dir>/wandb/.

A method's warm start is the sibling cell of the same output_dir and seed (`sibling`), which is why
grids that reuse another axis value's warm start link it into place at exactly that path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from clipit.errors import ConfigError

RUNS = "runs"
SEED_PREFIX = "seed-"
BEST = "best"  # checkpoint stem: best.safetensors + best.json
CONFIG = "config.yaml"
TRAIN_SUMMARY = "train_summary.json"
PROVENANCE = "provenance.json"
METRICS = "metrics.json"
STATE = "state.json"
TENSORBOARD = "tb"  # <output_dir>/tb: the TensorBoard root, next to runs/
WANDB = "wandb"  # <output_dir>/wandb: W&B's local run files (its `dir`), next to runs/
TRAIN_LOG = "train.log"
CHECKPOINTS = "checkpoints"
# folders inside a run directory (or next to the runs) that hold no runs: not searched for runs
NOT_RUNS = frozenset({TENSORBOARD, WANDB, CHECKPOINTS, "submitit", "report"})
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


@dataclass(frozen=True)
class RunId:
    output_dir: Path
    method: str
    seed: int


def check_name(name: str, what: str = "method name") -> str:
    """A name that becomes a path component: no separators, no `..`, nothing hidden."""
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise ConfigError(f"{what} {name!r} cannot name a folder; use letters, digits and . _ + - only")
    return name


def run_dir(output_dir: str | Path, method: str, seed: int) -> Path:
    return Path(output_dir) / RUNS / check_name(method) / f"{SEED_PREFIX}{int(seed)}"


def parse_run_dir(path: str | Path) -> RunId | None:
    """(output_dir, method, seed) of `<output_dir>/runs/<method>/seed-<n>`; None for any other path."""
    path = Path(path)
    name, method_dir = path.name, path.parent
    if not name.startswith(SEED_PREFIX) or not name[len(SEED_PREFIX) :].isdigit() or method_dir.parent.name != RUNS:
        return None
    return RunId(method_dir.parent.parent, method_dir.name, int(name[len(SEED_PREFIX) :]))


def sibling(run: str | Path, method: str) -> Path:
    """The run of `method` with the same output_dir and seed as `run` (where warm starts live)."""
    run = Path(run)
    return run.parent.parent / check_name(method) / run.name


def best(run: str | Path) -> Path:
    return Path(run) / BEST


def warm_start(run: str | Path, method: str) -> Path:
    """The best checkpoint (stem) of `method`'s sibling run: the warm start of `run`."""
    return best(sibling(run, method))


def config_file(run: str | Path) -> Path:
    return Path(run) / CONFIG


def train_summary(run: str | Path) -> Path:
    return Path(run) / TRAIN_SUMMARY


def provenance_file(run: str | Path) -> Path:
    return Path(run) / PROVENANCE


def metrics_file(run: str | Path, split: str = "test") -> Path:
    """metrics.json for the test split (what marks a run evaluated); metrics-<split>.json for others."""
    return Path(run) / (METRICS if split == "test" else f"metrics-{split}.json")


def frozen_eval_file(run: str | Path) -> Path:
    """`clipit evaluate --frozen`'s k-NN and SimpleShot numbers for the run's backbone."""
    return Path(run) / "frozen_eval.json"


def predictions_file(run: str | Path, split: str = "test") -> Path:
    return Path(run) / f"predictions-{split}.npz"


def state_file(run: str | Path) -> Path:
    return Path(run) / STATE


def tensorboard_root(output_dir: str | Path) -> Path:
    """What to give `tensorboard --logdir`: every run of the output_dir, named `<method>/seed-<n>`."""
    return Path(output_dir) / TENSORBOARD


def tensorboard_dir(run: str | Path) -> Path:
    """The run's TensorBoard events: `<output_dir>/tb/<method>/seed-<n>`; `<run>/tb` for a run
    directory outside the layout (a library caller's own folder)."""
    rid = parse_run_dir(run)
    if rid is None:
        return Path(run) / TENSORBOARD
    return tensorboard_root(rid.output_dir) / rid.method / f"{SEED_PREFIX}{rid.seed}"


def wandb_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / WANDB


def train_log(run: str | Path) -> Path:
    return Path(run) / TRAIN_LOG


def resume_dir(run: str | Path) -> Path:
    return Path(run) / CHECKPOINTS / "latest"


def is_trained(run: str | Path) -> bool:
    return train_summary(run).exists()


def is_finished(run: str | Path) -> bool:
    """Trained and evaluated: the skip contract of the trainer, the pipeline and the grid."""
    return train_summary(run).exists() and metrics_file(run).exists()


# Frozen-backbone features, computed once per backbone identity and preprocessing next to the shards they
# come from and shared by every seed and method (clipit/training/features.py):
#     <shards_dir>/features/<key>/manifest.json, <split>/<split>-NNNNNN.safetensors
FEATURES = "features"


def feature_cache_dir(shard_dir: str | Path, key: str) -> Path:
    return Path(shard_dir) / FEATURES / check_name(key, "feature cache key")


def feature_part(cache_dir: str | Path, split: str, index: int) -> Path:
    """Features of shard `index` of `split` (the same samples, in the same order)."""
    return Path(cache_dir) / split / f"{split}-{int(index):06d}.safetensors"


REPRODUCE_CHAIN = "reproduce-chain.json"


def reproduce_chain_file(grid_root: str | Path) -> Path:
    """The job ids `clipit reproduce` queued last for a grid root (in its submitit/ log folder), so that a
    rerun does not queue a second chain beside one still in flight."""
    return Path(grid_root) / "submitit" / REPRODUCE_CHAIN
