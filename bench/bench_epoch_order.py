"""What one training epoch draws, without images: the train loader's epoch plan (clipit/training/epochs.py)
over a class-sorted split written in clipit's write order (clipit/shards/order.py), from the labels alone.

    python bench/bench_epoch_order.py                       # CRC's 80,000 training tiles, 1,000 per shard, batch 64
    python bench/bench_epoch_order.py --world 4 --workers 8

The split is laid out class by class (as CRC, BACH, the demo and folder datasets list their images) with
NCT-CRC-HE-100K's class proportions; every (rank, worker) share of epochs 0 and 1 is drawn and counted:
unique samples seen, samples drawn twice, and the mean distinct classes per batch beside what a uniformly
random batch would hold.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clipit.shards.manifest import num_shards, shard_count
from clipit.shards.order import plan_order, split_order
from clipit.training.coverage import random_batch_classes
from clipit.training.epochs import slot_plan

# NCT-CRC-HE-100K per class (ADI BACK DEB LYM MUC MUS NORM STR TUM)
CRC_CLASSES = (10407, 10566, 11512, 11557, 8896, 13536, 8763, 10446, 14317)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=80_000)
    ap.add_argument("--per-shard", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--world", type=int, default=1)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    n = args.samples
    shares = np.array(CRC_CLASSES) / sum(CRC_CLASSES)
    per_class = np.floor(shares * n).astype(int)
    per_class[-1] += n - per_class.sum()
    labels = np.repeat(np.arange(len(per_class)), per_class)  # dataset order: class by class
    order = split_order({"order": plan_order({"train": n})}, "train")
    written = labels[order]  # label at each write position
    counts = [shard_count(n, args.per_shard, i) for i in range(num_shards(n, args.per_shard))]
    offsets = np.cumsum([0, *counts])
    expected = random_batch_classes({str(c): int(k) for c, k in enumerate(per_class)}, args.batch_size)
    print(
        f"{n:,} samples of {len(per_class)} classes in {len(counts)} shards, batch {args.batch_size}, "
        f"{args.world} rank(s) x {max(1, args.workers)} stream(s)"
    )
    for epoch in (0, 1):
        positions, classes = [], []
        for rank in range(args.world):
            for worker in range(max(1, args.workers)):
                plan = slot_plan(counts, args.batch_size, args.world, args.workers, args.seed, epoch, rank, worker)
                mine = np.concatenate([offsets[s] + p for s, p in plan]) if plan else np.zeros(0, int)
                positions.append(mine)
                for start in range(0, len(mine), args.batch_size):
                    classes.append(len(set(written[mine[start : start + args.batch_size]].tolist())))
        drawn = np.concatenate(positions)
        unique = len(np.unique(drawn))
        print(
            f"epoch {epoch + 1}: {unique:,}/{n:,} unique samples seen ({100 * unique / n:.1f}%), "
            f"{len(drawn) - unique} drawn twice; {np.mean(classes):.2f} of {len(per_class)} classes per batch "
            f"(a random batch: {expected:.2f}; min {min(classes)})"
        )


if __name__ == "__main__":
    main()
