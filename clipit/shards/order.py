"""The write order of a shard set's splits. The train split is written as a seeded permutation of the
dataset's order, so each shard holds a random sample of the split (most datasets list their images class
by class); evaluation splits stay in dataset order. The plan and the manifest record it under `order`:

    "order": {"train": {"rng": "numpy.random.default_rng(seed).permutation(count)", "seed": 0,
                        "count": <split size>, "sha256": <of the permutation as little-endian int64>}}

Write position p of the train split holds dataset sample permutation[p]; the sample keeps its dataset
index in its key. A set without the record was written in dataset order and is refused for training.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from clipit.errors import one_line
from clipit.shards.manifest import MANIFEST, MANIFEST_FIX, REBUILD_SET, ShardError

SHUFFLED_SPLITS = ("train",)  # written as a seeded permutation; the others in dataset order (evaluation)
ORDER_SEED = 0  # the write order is part of the set, not of a run: one fixed seed
ORDER_RNG = "numpy.random.default_rng(seed).permutation(count)"


def _permutation(seed: int, count: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(count).astype(np.int64)


def _digest(order: np.ndarray) -> str:
    return hashlib.sha256(order.astype("<i8").tobytes()).hexdigest()


def shuffle_record(count: int, seed: int = ORDER_SEED) -> dict:
    """The plan's record of one shuffled split: how to draw its permutation and the sha256 of the result."""
    return {"rng": ORDER_RNG, "seed": int(seed), "count": int(count), "sha256": _digest(_permutation(seed, count))}


def plan_order(counts: dict[str, int]) -> dict:
    """The `order` of a new plan: the shuffled splits among `counts` (split -> size)."""
    return {split: shuffle_record(n) for split, n in counts.items() if split in SHUFFLED_SPLITS}


def split_order(plan: dict, split: str, where: str | Path = MANIFEST) -> np.ndarray | None:
    """Dataset index per write position of `split` (None: dataset order), regenerated from the plan's
    record and checked against its sha256."""
    record = (plan.get("order") or {}).get(split)
    if record is None:
        return None
    try:
        if record["rng"] != ORDER_RNG:
            raise ValueError(f"rng {record['rng']!r}")
        order = _permutation(int(record["seed"]), int(record["count"]))
    except (KeyError, TypeError, ValueError) as err:
        raise ShardError(f"{where}: order of split {split} unreadable ({one_line(err)}); {MANIFEST_FIX}") from None
    if _digest(order) != record.get("sha256"):
        raise ShardError(
            f"{where}: this numpy draws another permutation for split {split} than the one its shards were "
            f"written in; use the numpy that built it, or "
            f"{REBUILD_SET}"
        )
    return order


def require_shuffled_train(shard_dir: str | Path, manifest: dict) -> None:
    """Training reads a train split written as a seeded permutation: a set written in dataset order (its
    manifest has no `order`) is refused with one line naming the command that rebuilds it."""
    if "train" not in (manifest.get("order") or {}):
        raise ShardError(
            f"{Path(shard_dir) / MANIFEST}: the train split was written in dataset order (a set built before "
            f"training splits were shuffled at write time), so its batches would hold few classes; "
            f"{REBUILD_SET}"
        )
