"""Shard loaders for training and evaluation.

Training: shards are resampled with a deterministic per-(rank, worker) seed, so every rank gets
the same number of batches and no rank ever hangs at a collective, whatever the shard count.
The loader is never passed through `accelerator.prepare` (it would shard the data a second time).
Evaluation: each rank reads a disjoint, ordered subset of the shards exactly once.
Images stay uint8 until they reach the device, where they are resized, augmented and normalised.
"""
from __future__ import annotations

import io
import json

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from clipit.shards.format import decode_embedding

IMAGE_FIELDS = ("png", "jpg", "jpeg", "tif", "tiff")


def decode_sample(sample: dict, load_size: int | None = None) -> tuple:
    field = next((f for f in IMAGE_FIELDS if f in sample), None)
    if field is None:
        raise ValueError(f"{sample.get('__url__')}:{sample.get('__key__')}: sample has no image field {IMAGE_FIELDS}")
    with Image.open(io.BytesIO(sample[field])) as img:
        img = img.convert("RGB")
        if load_size and min(img.size) > load_size:  # shrink big tiles (BACH) in the worker, not on the device
            scale = load_size / min(img.size)
            img = img.resize((max(load_size, round(img.width * scale)), max(load_size, round(img.height * scale))),
                             Image.BILINEAR, reducing_gap=2.0)
            img = _center_crop(img, load_size)
        array = np.asarray(img, dtype=np.uint8)
    emb = decode_embedding(sample["emb.npy"]) if "emb.npy" in sample else np.zeros(0, np.float16)
    report_index = json.loads(sample["json"]).get("report_index", -1) if "json" in sample else -1
    return array, int(sample["cls"]), emb, sample["__key__"], report_index


def _center_crop(img: Image.Image, size: int) -> Image.Image:
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return img.crop((left, top, left + size, top + size))


def collate(samples: list[tuple]) -> dict:
    """np.stack collation: webdataset's default collation of numpy images is ~100x slower."""
    images, labels, embs, keys, report_index = zip(*samples)
    return {
        "images": torch.from_numpy(np.stack(images)),  # uint8 [B, H, W, 3]
        "labels": torch.tensor(labels, dtype=torch.long),
        "text_emb": torch.from_numpy(np.stack(embs).astype(np.float32)),
        "report_index": torch.tensor(report_index, dtype=torch.long),  # row of the shards' texts.jsonl
        "keys": list(keys),
    }


def train_loader(urls: list[str], batch_size: int, batches_per_epoch: int, seed: int, num_workers: int = 0,
                 load_size: int | None = None, shuffle_buffer: int = 2000, start_epoch: int = 0) -> wds.WebLoader:
    """Deterministic full batches for this rank; each `iter()` starts the next epoch.

    Epoch e of (rank, worker) always draws the same shards and samples, which is what makes a
    resumed run see the data an uninterrupted one would. With several workers each has its own
    stream and yields at least its share; the trainer takes exactly `batches_per_epoch` per epoch.
    """
    workers = max(1, num_workers)
    per_worker = -(-batches_per_epoch // workers)
    shards = wds.ResampledShards(urls, seed=seed, deterministic=True)
    shards.epoch = start_epoch - 1  # incremented on every iter(); workers inherit it
    pipeline = wds.DataPipeline(
        shards,
        wds.tarfile_to_samples(),
        wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 500), seed=seed),
        wds.map(lambda s: decode_sample(s, load_size)),
        wds.batched(batch_size, collation_fn=collate, partial=False),
    ).with_epoch(per_worker)
    return wds.WebLoader(pipeline, batch_size=None, num_workers=num_workers, persistent_workers=num_workers > 0)


def eval_loader(urls: list[str], batch_size: int, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                load_size: int | None = None) -> wds.WebLoader | list:
    """Each sample once across all ranks: rank r reads shards r, r + world, ... in order."""
    mine = urls[rank::world_size]
    if not mine:  # fewer shards than ranks: this rank contributes nothing, the gather still lines up
        return []
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(mine),
        wds.split_by_worker,
        wds.tarfile_to_samples(),
        wds.map(lambda s: decode_sample(s, load_size)),
        wds.batched(batch_size, collation_fn=collate, partial=True),
    )
    return wds.WebLoader(pipeline, batch_size=None, num_workers=min(num_workers, len(mine)))
