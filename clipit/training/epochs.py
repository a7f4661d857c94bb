"""What one training epoch reads, per (rank, loader worker): a pure function of the shard counts, the
batch size, the world size, the worker count, the run's seed and the epoch, so the shard loader
(loader.train_loader), the cached-feature replay (probe.train_order) and a resumed run all agree.

The epoch's order: the train shards in a permutation seeded by (seed, epoch), each shard's samples in
a permutation seeded by (seed, epoch, shard); the shards themselves hold a seeded permutation of the
split (shards/manifest.py: `order`), so a shard is a random sample of every class. Rank r takes
positions [r·R·B, (r+1)·R·B) of that order, where R = N // (B·W) is the batches per rank and epoch
(N train samples, B batch_size, W processes): every rank runs the same R steps, so none waits at a
collective for another. Within a rank, worker k of K takes the next R // K batches (one more for the
first R % K workers) as one contiguous stretch, so it reads whole shards (a shard split between two
workers or ranks is read by both, each keeping its part). torch's DataLoader hands out the workers'
batches in turn, worker 0 first, skipping a worker that has run out.

The remainder rule: an epoch trains on R·B·W samples, each exactly once; the last N - R·B·W (fewer than
one global batch of B·W) of the epoch's order are not drawn that epoch. The order changes every epoch,
so which samples wait differs. A split smaller than one global batch is refused (`batches_per_rank`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from clipit.config import ConfigError

EPOCH_STREAM = 0x5EED  # keeps the epoch's shard permutation apart from the shards' own write order


def batches_per_rank(n_samples: int, batch_size: int, world: int, key: str = "batch_size") -> int:
    """R = N // (B·W): full batches per rank and epoch; a split smaller than one global batch is refused."""
    batches = n_samples // (batch_size * world)
    if batches < 1:
        raise ConfigError(
            f"{key}={batch_size} x {world} process(es) = {batch_size * world} images per step, but the train "
            f"split holds {n_samples}: an epoch draws every sample at most once; set {key} <= "
            f"{max(1, n_samples // world)}"
        )
    return batches


def worker_batches(batches: int, workers: int) -> list[int]:
    """Batches of each of `workers` loader workers of a rank with `batches` per epoch (first ones +1)."""
    workers = max(1, workers)
    return [batches // workers + (k < batches % workers) for k in range(workers)]


def shard_permutation(seed: int, epoch: int, shard: int, count: int) -> np.ndarray:
    """The order in which epoch `epoch` takes shard `shard`'s samples (positions in the tar)."""
    return np.random.default_rng([EPOCH_STREAM, seed, epoch, shard]).permutation(count)


def slot_plan(
    counts: Sequence[int], batch_size: int, world: int, workers: int, seed: int, epoch: int, rank: int, worker: int
) -> list[tuple[int, np.ndarray]]:
    """(shard index, positions in that shard in the order they are drawn) for worker `worker` of rank
    `rank` in epoch `epoch`: exactly worker_batches(...)[worker] * batch_size samples."""
    counts = np.asarray(counts, dtype=np.int64)
    per_rank = batches_per_rank(int(counts.sum()), batch_size, world)
    mine = worker_batches(per_rank, workers)
    start = (rank * per_rank + sum(mine[:worker])) * batch_size
    stop = start + mine[worker] * batch_size
    if stop == start:  # more workers than batches: this one reads nothing
        return []
    order = np.random.default_rng([EPOCH_STREAM, seed, epoch]).permutation(len(counts))
    ends = np.cumsum(counts[order])
    plan, begin = [], 0
    for shard, end in zip(order.tolist(), ends.tolist()):
        if end > start and begin < stop:
            within = shard_permutation(seed, epoch, shard, end - begin)
            plan.append((shard, within[max(start - begin, 0) : min(stop, end) - begin]))
        begin = end
        if begin >= stop:
            break
    return plan


def pick(samples: Iterator, positions: np.ndarray, count: int, on_count) -> Iterator:
    """The samples of one shard (read in stored order) at `positions`, in that order. Only the picked
    ones are held (at most one shard). `on_count(got)` is called when the shard does not hold `count`."""
    wanted = set(positions.tolist())
    held, got = {}, 0
    for position, sample in enumerate(samples):
        if position in wanted:
            held[position] = sample
        got = position + 1
    if got != count:
        on_count(got)
    for position in positions.tolist():
        yield held.pop(position)
