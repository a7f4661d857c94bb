"""What each epoch's batches actually held, from the sample keys and labels the loop drew (not from the
plan): how many of the train split's samples were seen, how many twice, and how many classes a batch
held on average beside what a uniformly random batch of the same size would hold. train.log gets one line
per epoch and train_summary.json the list (`coverage`).

Cheap by design: per step the batch's keys are turned into dataset indices (a count per sample, on the
CPU) and its distinct labels counted; the ranks' counts are summed once per epoch and at each resume
checkpoint (one all-reduce of N + 3 integers). A resume checkpoint stores the open epoch's samples seen
(a bit per sample) and totals, so a resumed epoch reports the batches of both attempts.
"""

from __future__ import annotations

import base64
import math

import numpy as np
import torch

from clipit.shards.manifest import sample_index


def random_batch_classes(class_counts: dict, batch_size: int) -> float:
    """Expected distinct classes in a batch drawn uniformly without replacement from the split:
    sum over classes of 1 - C(N - n_c, B) / C(N, B)."""
    counts = [int(v) for v in class_counts.values()]
    total = sum(counts)

    def log_choose(n: int, k: int) -> float:
        return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)

    expected = 0.0
    for n in counts:
        if total - n < batch_size:
            expected += 1.0
        else:
            expected += 1.0 - math.exp(log_choose(total - n, batch_size) - log_choose(total, batch_size))
    return expected


class EpochCoverage:
    """This rank's draws in the current epoch; `merged` sums them over ranks (a collective: every rank
    calls it at the same step)."""

    def __init__(self, split_size: int, class_counts: dict, batch_size: int, world: int, per_epoch: int):
        self.split_size, self.batch_size, self.world, self.per_epoch = split_size, batch_size, world, per_epoch
        self.n_classes = len(class_counts)
        self.random_classes = round(random_batch_classes(class_counts, batch_size), 3)
        self.epochs: list[dict] = []  # closed epochs (every rank keeps the same merged records)
        self.epoch: int | None = None
        self._reset()

    def _reset(self) -> None:
        self.counts = np.zeros(self.split_size, dtype=np.int32)
        self.batches = self.class_sum = self.drawn = 0

    def add(self, batch: dict, epoch: int) -> None:
        """One drawn batch of epoch `epoch` (0-based)."""
        self.epoch = epoch
        index = np.fromiter((sample_index(k) for k in batch["keys"]), dtype=np.int64, count=len(batch["keys"]))
        np.add.at(self.counts, index[(index >= 0) & (index < self.split_size)], 1)
        self.batches += 1
        self.drawn += len(index)
        self.class_sum += len(set(batch["labels"].tolist()))

    def merged(self, accelerator) -> tuple[np.ndarray, int, int, int]:
        """(draws per sample, batches, distinct classes summed over batches, samples drawn) of every rank."""
        local = np.concatenate([[self.batches, self.class_sum, self.drawn], self.counts]).astype(np.int64)
        total = torch.from_numpy(local).to(accelerator.device)
        if accelerator.num_processes > 1:
            total = accelerator.reduce(total, reduction="sum")
        total = total.cpu().numpy()
        return total[3:], int(total[0]), int(total[1]), int(total[2])

    def state(self, accelerator) -> dict:
        """For the resume checkpoint: the closed epochs and the open one (samples seen as bits)."""
        counts, batches, class_sum, drawn = self.merged(accelerator)
        seen = base64.b64encode(np.packbits(counts > 0).tobytes()).decode("ascii")
        open_epoch = {"epoch": self.epoch, "batches": batches, "class_sum": class_sum, "drawn": drawn, "seen": seen}
        return {"epochs": list(self.epochs), "open": open_epoch if batches else None}

    def restore(self, state: dict | None, epoch: int, main: bool) -> None:
        """Continue from a checkpoint's `state` in epoch `epoch`: its open epoch goes on (rank 0 holds the
        merged counts so far; a sum over ranks adds them once), or is closed when the resume starts a
        new epoch (the checkpoint fell on an epoch's last step)."""
        if not state:
            return
        self.epochs = list(state.get("epochs") or [])
        previous = state.get("open")
        if not previous:
            return
        seen = np.unpackbits(np.frombuffer(base64.b64decode(previous["seen"]), dtype=np.uint8))[: self.split_size]
        drawn, batches, class_sum = int(previous["drawn"]), int(previous["batches"]), int(previous["class_sum"])
        if previous["epoch"] != epoch:
            self.epochs.append(self._record(previous["epoch"], seen.astype(np.int32), batches, class_sum, drawn))
            return
        self.epoch = epoch
        if main:
            self.counts = seen.astype(np.int32)
            self.batches, self.class_sum, self.drawn = batches, class_sum, drawn

    def close(self, accelerator) -> dict | None:
        """End the open epoch (a collective); returns its record (None when it drew nothing)."""
        counts, batches, class_sum, drawn = self.merged(accelerator)
        self._reset()
        if not batches:
            return None
        record = self._record(self.epoch, counts, batches, class_sum, drawn)
        self.epochs.append(record)
        return record

    def _record(self, epoch: int, counts: np.ndarray, batches: int, class_sum: int, drawn: int) -> dict:
        unique = int((counts > 0).sum())
        complete = batches == self.per_epoch * self.world
        return {
            "epoch": int(epoch) + 1,
            "batches_per_rank": batches // self.world,
            "complete": complete,
            "split_size": self.split_size,
            "samples_drawn": drawn,
            "unique_samples": unique,
            "seen_fraction": round(unique / self.split_size, 6),
            "drawn_twice_or_more": drawn - unique,
            # the remainder rule (training/epochs.py): fewer than one global batch waits for a later epoch
            "not_drawn": self.split_size - unique,
            "classes_per_batch": round(class_sum / batches, 3),
            "random_batch_classes": self.random_classes,
            "classes": self.n_classes,
        }


def coverage_line(record: dict, epochs: int) -> str:
    """train.log's line for one epoch's record."""
    twice = record["drawn_twice_or_more"]
    part = "" if record["complete"] else f" (partial: {record['batches_per_rank']} batches per rank)"
    return (
        f"epoch {record['epoch']}/{epochs} coverage{part}: {record['unique_samples']}/{record['split_size']} "
        f"training samples seen ({100 * record['seen_fraction']:.1f}%), {twice or 'none'} drawn twice, "
        f"{record['not_drawn']} not drawn; {record['classes_per_batch']:.2f} of {record['classes']} classes per "
        f"batch (a random batch: {record['random_batch_classes']:.2f})"
    )
