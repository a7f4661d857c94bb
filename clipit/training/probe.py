"""The trainer's inputs for a model whose backbone is frozen and whose images are not augmented: the
backbone's cached features instead of images (training/features.py).

`cached_inputs` gives the training loop (trainer.setup_run) three stand-ins and changes nothing else in it:
  model       FeatureHead: the model's own submodules (same names, same tensors), run from features;
              its checkpoint (best.safetensors, resume state) is the model's, so warm starts,
              evaluation and export read it as before
  preprocess  the identity (features need none)
  batches     `train_order` replays the shard loader's epoch order (loader.train_stream, epochs.py)
              over cached rows instead of tar samples, per rank and per loader worker, so every step
              sees exactly the samples, in exactly the order, that the online loop sees; validation
              takes each rank's shards as loader.eval_loader does
The step plan, optimizer, schedule, clipping, validation, selection, patience, resume, signals and
logging are the trainer's. Only float rounding differs: the cache computes features in eval mode, in
batches of 2 x batch_size (the registered backbones have no dropout or batch norm).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from clipit.config import ExperimentConfig
from clipit.training.feature_files import FeatureSplit, load_split
from clipit.training.features import ensure_cache, uses_feature_cache
from clipit.training.loader import train_stream
from clipit.training.predict import ShardSource

__all__ = ["CachedInputs", "FeatureHead", "cached_inputs", "train_order", "uses_feature_cache"]


class FeatureHead(nn.Module):
    """`model` run from its backbone's output: forward(feats, text_emb) = model.from_features(...). It
    registers the model's own children under their names, so its state dict is the model's."""

    def __init__(self, model: nn.Module):
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "_model", model)  # not a submodule: the children are registered once

    def forward(self, feats: torch.Tensor, text_emb: torch.Tensor | None = None, **_) -> dict:
        return self._model.from_features(feats, text_emb)

    def pretrained_modules(self, warm_head: bool) -> tuple[str, ...]:
        return self._model.pretrained_modules(warm_head)


class Features(nn.Module):
    """The preprocessing of cached features: none. `size` is the images' (the checkpoint records it)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def forward(self, feats: torch.Tensor, augment: str | None = None, generator=None) -> torch.Tensor:
        return feats


def train_order(
    urls: list[str],
    rows: list[range],
    batch_size: int,
    seed: int,
    num_workers: int = 0,
    rank: int = 0,
    world: int = 1,
    start_epoch: int = 0,
):
    """Per epoch, the row-index batches that `loader.train_loader(urls, ...)` gives this rank.

    Each loader worker w reads its own share of the epoch (training/epochs.py); torch's DataLoader hands
    out their batches in turn, worker 0 first, skipping a worker that has run out. Every call of the
    returned function starts the next epoch, as every `iter()` of the real loader does."""
    workers = max(1, num_workers)
    streams = [
        train_stream(
            urls,
            [len(r) for r in rows],
            lambda index: iter(rows[index]),
            lambda row: row,
            torch.tensor,
            batch_size,
            seed,
            rank,
            world,
            workers,
            start_epoch,
            worker=w,
        )
        for w in range(workers)
    ]

    def next_epoch() -> list[torch.Tensor]:
        iterators = [iter(stream) for stream in streams]
        batches = []
        while iterators:
            for it in list(iterators):
                batch = next(it, None)
                if batch is None:
                    iterators.remove(it)
                else:
                    batches.append(batch)
        return batches

    return next_epoch


def _batch(split: FeatureSplit, rows: torch.Tensor) -> dict:
    """A loader batch with the features as the model's input ("images")."""
    on_device = rows.to(split.features.device)
    return {
        "images": split.features[on_device],
        "labels": split.labels[rows],
        "text_emb": split.text_emb[on_device],
        "report_index": torch.full((len(rows),), -1, dtype=torch.long),
        "keys": [split.keys[i] for i in rows.tolist()],
    }


class _TrainBatches:
    """Like train_loader: each iter() is the next epoch's batches."""

    def __init__(self, split: FeatureSplit, next_epoch):
        self.split, self.next_epoch = split, next_epoch

    def __iter__(self):
        for rows in self.next_epoch():
            yield _batch(self.split, rows)


@dataclass
class CachedInputs:
    model: FeatureHead
    preprocess: Features
    cache_dir: Path
    train: FeatureSplit = field(repr=False)
    val: FeatureSplit = field(repr=False)
    urls: list[str] = field(repr=False)

    def train_batches(
        self, batch_size: int, seed: int, num_workers: int, rank: int, world: int, start_epoch: int
    ) -> _TrainBatches:
        return _TrainBatches(
            self.train,
            train_order(self.urls, self.train.rows, batch_size, seed, num_workers, rank, world, start_epoch),
        )

    def val_batches(self, batch_size: int, rank: int, world: int) -> list[dict]:
        """Rank r's validation batches from shards r, r + world, ... (as loader.eval_loader splits them)."""
        rows = [r for shard in self.val.rows[rank::world] for r in shard]
        return [
            _batch(self.val, torch.tensor(rows[i : i + batch_size], dtype=torch.long))
            for i in range(0, len(rows), batch_size)
        ]


def cached_inputs(
    cfg: ExperimentConfig, method: str, accelerator, manifest: dict, model: nn.Module, preprocess, log=print
) -> CachedInputs | None:
    """The cached stand-ins for `model` (built on the first use of the cache), or None when the run must
    see images (trainable backbone, augmentation, a text tower, feature_cache: false)."""
    if not uses_feature_cache(cfg, method, model):
        return None
    tcfg = cfg.methods[method]
    cache_dir, cache_manifest, forwards = ensure_cache(accelerator, cfg, tcfg, model, preprocess, manifest, log)
    if accelerator.is_main_process:
        log(
            f"[clipit train] {method}: training on cached features {cache_dir} "
            f"({f'built: {forwards} backbone forwards' if forwards else 'reused: no backbone forwards'})",
            flush=True,
        )
    device = accelerator.device
    return CachedInputs(
        FeatureHead(model),
        Features(preprocess.size),
        cache_dir,
        load_split(cache_dir, cache_manifest, "train", device),
        load_split(cache_dir, cache_manifest, "val", device),
        ShardSource(Path(cfg.shards.dir), "train", manifest).urls,
    )
