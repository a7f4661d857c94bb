"""Shard loaders for training and evaluation.

Training: each epoch reads every train sample at most once across all ranks and workers, in an order
seeded by (seed, epoch) (clipit/training/epochs.py: the order, the per-(rank, worker) share, the
remainder rule); every rank gets the same number of full batches, so none hangs at a collective.
The loader is never passed through `accelerator.prepare` (it would shard the data a second time).
Evaluation: each rank reads a disjoint, ordered subset of the shards exactly once.
Images stay uint8 until they reach the device, where they are augmented and normalised; every image
leaves the loader at the model's input size (`load_image`), whatever its size, shape or mode.

A bad shard met here (a truncated or garbled tar, an image that does not decode, a field missing or
unreadable) is one ShardError naming the shard and the sample, in a worker process too, never a
PIL/tarfile traceback and never a quietly shorter shard: tars are read by shards/reader.py's strict
reader, not by webdataset's (whose default handler re-raises the raw exception and whose tar
iteration stops quietly at a cut).
"""

from __future__ import annotations

import json

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from clipit.data.base import ImageDecodeError, decode_image, worker_error
from clipit.errors import one_line
from clipit.shards.codec import IMAGE_FIELDS, RAW_FIELD, decode_embedding, image_field, sample_pixels
from clipit.shards.manifest import REBUILD, ShardError
from clipit.shards.reader import read_shard, tar_samples
from clipit.training.epochs import pick, slot_plan

__all__ = ["IMAGE_FIELDS", "collate", "decode_sample", "eval_loader", "load_image", "train_loader", "train_stream"]


def load_image(data: bytes | np.ndarray, size: int | None = None) -> np.ndarray:
    """uint8 HWC RGB from encoded bytes (decode_image: every mode and bit depth, or ImageDecodeError) or
    from uint8 HWC RGB pixels (a raw shard's: returned as they are when they have the size already).

    With `size`, exactly size x size: the short side is resized to `size` (big tiles shrink here, in the
    worker; small ones grow) and the centre is cut out, so a non-square image is cropped like a big one
    rather than stretched, and images of mixed sizes can share a batch."""
    if isinstance(data, np.ndarray):
        if not size or data.shape[:2] == (size, size):
            return data
        img = Image.fromarray(data)
    else:
        img = decode_image(data)
    if size and img.size != (size, size):
        scale = size / min(img.size)
        if scale != 1:
            img = img.resize(
                (max(size, round(img.width * scale)), max(size, round(img.height * scale))),
                Image.BILINEAR,
                reducing_gap=2.0,
            )
        img = _center_crop(img, size)
    return np.asarray(img, dtype=np.uint8)


def decode_sample(sample: dict, load_size: int | None = None, image: dict | None = None) -> tuple:
    """(image uint8 HWC, label, text embedding, key, report_index) of a shard sample; a bad sample is a
    ShardError naming the shard (`__url__`) and the sample key. `image`: the manifest's image spec; a raw
    sample whose recorded shape is not the set's would decode as garbled pixels of the same byte count."""
    url, key = sample.get("__url__", "?"), sample.get("__key__", "?")

    def bad(what: str) -> ShardError:
        return ShardError(f"{url}: sample {key}: {what}; the shard is corrupt: {REBUILD}")

    field = image_field(sample)
    if field is None:
        raise bad(f"no image field ({'/'.join(IMAGE_FIELDS)})")
    for name in ("cls", "emb.npy", "json"):
        if name not in sample:
            raise bad(f"no {name}")
    try:
        label = int(sample["cls"])
        emb = decode_embedding(sample["emb.npy"])
        meta = json.loads(sample["json"])
        report_index = meta.get("report_index", -1)
    except Exception as err:  # int(), np.load and json raise several types for garbage
        raise bad(f"cls, emb.npy or json unreadable ({one_line(err)})") from None
    if image and image.get("codec") == "raw" and field == RAW_FIELD and meta.get("image_shape") != image["shape"]:
        raise bad(f"image_shape {meta.get('image_shape')!r} where the manifest's raw codec has {image['shape']}")
    try:
        array = load_image(sample_pixels(sample, meta), load_size)
    except ImageDecodeError as err:
        raise bad(f"its {field} image does not decode ({err})") from None
    if emb.ndim != 1 or not isinstance(report_index, int):
        raise bad(f"emb.npy of shape {emb.shape} or report_index {report_index!r} is not what a shard build writes")
    return array, label, emb, key, report_index


def _center_crop(img: Image.Image, size: int) -> Image.Image:
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return img.crop((left, top, left + size, top + size))


def collate(samples: list[tuple]) -> dict:
    """np.stack collation: webdataset's default collation of numpy images is ~100x slower."""
    images, labels, embs, keys, report_index, *url = zip(*samples)
    batch = {
        "images": torch.from_numpy(np.stack(images)),  # uint8 [B, H, W, 3]
        "labels": torch.tensor(labels, dtype=torch.long),
        "text_emb": torch.from_numpy(np.stack(embs).astype(np.float32)),
        "report_index": torch.tensor(report_index, dtype=torch.long),  # row of the shards' texts.jsonl
        "keys": list(keys),
    }
    return batch | ({"urls": list(url[0])} if url else {})


class _Loader(wds.WebLoader):
    """A WebLoader whose ShardError from a worker process keeps its one line (torch re-raises a worker's
    exception with the worker's traceback in its message). On a CUDA machine batches come in pinned
    memory, so the trainer's `.to(device, non_blocking=True)` copies overlap with compute."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("pin_memory", torch.cuda.is_available())
        super().__init__(*args, **kwargs)

    def __iter__(self):
        batches = super().__iter__()
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except ShardError as err:
                raise worker_error(err) from None
            yield batch


def train_loader(
    urls: list[str],
    counts: list[int],
    batch_size: int,
    seed: int,
    rank: int = 0,
    world: int = 1,
    num_workers: int = 0,
    load_size: int | None = None,
    start_epoch: int = 0,
    image: dict | None = None,
) -> wds.WebLoader:
    """This rank's full batches of each epoch (epochs.batches_per_rank of them); each `iter()` starts the
    next epoch. `counts`: the samples of each shard, from the manifest (a tar holding another number is a
    ShardError). Epoch e of a rank always gives the same batches in the same order, which is what makes a
    resumed run see the data an uninterrupted one would."""
    stream = train_stream(
        urls,
        counts,
        lambda index: read_shard(urls[index]),
        lambda s: decode_sample(s, load_size, image),
        collate,
        batch_size,
        seed,
        rank,
        world,
        num_workers,
        start_epoch,
    )
    return _Loader(stream, batch_size=None, num_workers=num_workers, persistent_workers=num_workers > 0)


class _EpochBatches(torch.utils.data.IterableDataset):
    """One (rank, worker)'s batches of the next epoch per iter(); in a loader worker process, the worker
    is torch's (its copy of this object counts its own epochs, as persistent workers keep it)."""

    def __init__(
        self, urls, counts, expand, transform, collation_fn, batch_size, seed, rank, world, workers, epoch, worker
    ):
        super().__init__()
        self.urls, self.counts, self.expand, self.transform = urls, list(counts), expand, transform
        self.collation_fn, self.batch_size, self.seed = collation_fn, batch_size, seed
        self.rank, self.world, self.workers, self.epoch, self.worker = rank, world, max(1, workers), epoch, worker

    def __iter__(self):
        self.epoch += 1
        worker = self.worker
        if worker is None:
            info = torch.utils.data.get_worker_info()
            worker = info.id if info is not None else 0
        plan = slot_plan(
            self.counts, self.batch_size, self.world, self.workers, self.seed, self.epoch, self.rank, worker
        )
        batch = []
        for shard, positions in plan:
            for sample in pick(self.expand(shard), positions, self.counts[shard], self._miscount(shard)):
                batch.append(self.transform(sample))
                if len(batch) == self.batch_size:
                    yield self.collation_fn(batch)
                    batch = []

    def _miscount(self, shard: int):
        def raise_(got: int):
            raise ShardError(
                f"{self.urls[shard]}: {got} samples where the manifest lists {self.counts[shard]}; {REBUILD}"
            )

        return raise_


def train_stream(
    urls: list[str],
    counts: list[int],
    expand,
    transform,
    collation_fn,
    batch_size: int,
    seed: int,
    rank: int = 0,
    world: int = 1,
    workers: int = 0,
    start_epoch: int = 0,
    worker: int | None = None,
) -> _EpochBatches:
    """The training order, in one place: epochs.slot_plan's shards and positions -> `expand` (shard index ->
    its samples in stored order) -> `transform` per sample -> full batches. The cached-feature probe
    (training/probe.py) expands shards into cached rows instead of tar samples, one stream per `worker`,
    and so replays exactly the batches `train_loader` gives."""
    if len(counts) != len(urls):
        raise ShardError(f"{len(urls)} train shards but {len(counts)} shard counts; {REBUILD}")
    return _EpochBatches(
        urls, counts, expand, transform, collation_fn, batch_size, seed, rank, world, workers, start_epoch - 1, worker
    )


def eval_loader(
    urls: list[str],
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    load_size: int | None = None,
    with_urls: bool = False,
    image: dict | None = None,
) -> wds.WebLoader | list:
    """Each sample once across all ranks: rank r reads shards r, r + world, ... in order. `with_urls`: each
    batch also names every sample's shard ("urls"), for the feature cache's per-shard files."""
    mine = urls[rank::world_size]
    if not mine:  # fewer shards than ranks: this rank contributes nothing, the gather still lines up
        return []
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(mine),
        wds.split_by_worker,
        tar_samples,
        wds.map(lambda s: decode_sample(s, load_size, image) + ((s.get("__url__"),) if with_urls else ())),
        wds.batched(batch_size, collation_fn=collate, partial=True),
    )
    return _Loader(pipeline, batch_size=None, num_workers=min(num_workers, len(mine)))
