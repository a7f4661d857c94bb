"""Shard read throughput of the training loader (clipit/training/loader.py) per image codec, 96-px tiles.

    python bench/bench_shard_read.py                     # 8 shards x 1,000 samples per codec, workers 0 and 2
    python bench/bench_shard_read.py --shards 16 --workers 0 2 4

The same H&E-like 96-px tiles (the demo generator, the size of PCAM patches) are written by clipit's own
writer twice, with shards.codec png (the PNG bytes as stored) and raw (uint8 pixels, `img.u8`), each
sample with a 512-d fp16 embedding and its json, like real shards. The baseline, measured in this
process for each set: iterating its tars without decoding anything (webdataset's tar reader, one
process), an upper bound for any single-process reader. clipit's train loader (the train split written
in its seeded permutation, as `clipit shard build` writes it; one epoch: shards in an epoch permutation,
each shard's samples shuffled, decoded, uint8 batches collated with np.stack) is timed with each worker
count; the goal is a loader at >= 90% of the raw tar read.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import webdataset as wds

from clipit.data.demo import DEMO_CLASSES, write_demo_images
from clipit.data.folder import ImageFolderDataset
from clipit.shards.codec import resolve_image
from clipit.shards.manifest import shard_count
from clipit.shards.order import plan_order, split_order
from clipit.shards.reader import iter_samples
from clipit.shards.writer import write_split_shards
from clipit.training.loader import eval_loader, train_loader


def build_shards(dataset, out: Path, per_shard: int, codec: str) -> tuple[list[str], float]:
    """(shard paths, seconds spent writing them: read + decode + tar + fsync, one process)."""
    n = dataset.split_size("train")
    rng = np.random.default_rng(0)
    text = rng.normal(size=(300, 512)).astype(np.float32)
    pairs = {"indices": rng.integers(0, 300, (n, 1)), "scores": rng.random((n, 1)).astype(np.float32)}
    order = split_order({"order": plan_order({"train": n})}, "train")  # the train split's write order
    start = time.perf_counter()
    paths = write_split_shards(
        dataset,
        "train",
        pairs,
        text,
        [f"R{i}" for i in range(300)],
        out,
        per_shard,
        image=resolve_image(codec, dataset),
        order=order,
    )
    return [str(p) for p in paths], time.perf_counter() - start


def rate(iterable, limit: int, count, warmup: int = 0) -> tuple[float, int]:
    """Steady-state samples per second over `limit` samples (items counted by `count`): the clock starts
    after the first item and `warmup` more samples (worker start-up, and each worker's first shard: a
    train loader reads a whole shard before it yields its samples in the epoch's order)."""
    it = iter(iterable)
    seen = count(next(it))
    while seen < warmup:
        seen += count(next(it))
    start, timed = time.perf_counter(), 0
    for item in it:
        timed += count(item)
        if timed >= limit:
            break
    return timed / (time.perf_counter() - start), timed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--per-shard", type=int, default=1000)
    ap.add_argument("--tile", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--samples", type=int, help="samples timed per path (default: as many as the set holds)")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--codecs", nargs="+", default=["png", "raw"], choices=["png", "raw"])
    ap.add_argument("--eval", action="store_true", help="time the eval loader too")
    ap.add_argument("--dir", type=Path, help="keep the shards here (default: a temp dir)")
    args = ap.parse_args()
    total = args.shards * args.per_shard
    limit = args.samples or total
    bs = args.batch_size
    print(
        f"{args.shards} shards x {args.per_shard} samples of {args.tile}-px tiles (+ cls + 512-d fp16 emb + json) "
        f"per codec | {os.cpu_count()} cpus, load average {os.getloadavg()[0]:.1f}"
    )
    rows = []  # (codec, path, samples/s, samples)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.dir or Path(tmp)
        images = write_demo_images(root / "tiles", {"train": total}, size=args.tile, seed=0)
        dataset = ImageFolderDataset(images, splits=("train",), classes=DEMO_CLASSES)
        for codec in args.codecs:
            urls, write_s = build_shards(dataset, root / f"shards-{codec}", args.per_shard, codec)
            size = sum(os.path.getsize(u) for u in urls)
            print(
                f"{codec}: {size / total / 1024:.1f} KiB/sample on disk; written at {total / write_s:,.0f} samples/s "
                "(one process, decode check + fsync included)"
            )
            raw = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None)
            rows.append((codec, "raw tar read, no decode (baseline)", *rate(raw, limit, lambda s: 1)))
            rows.append((codec, "clipit strict tar read, no decode", *rate(iter_samples(urls), limit, lambda s: 1)))
            for workers in args.workers:
                warmup = args.per_shard * max(1, workers)
                counts = [shard_count(total, args.per_shard, i) for i in range(len(urls))]
                loader = train_loader(urls, counts, bs, seed=0, num_workers=workers)
                rows.append(
                    (
                        codec,
                        f"train_loader, {workers} workers",
                        *rate(loader, limit, lambda b: len(b["labels"]), warmup),
                    )
                )
                if args.eval:
                    loader = eval_loader(urls, bs, num_workers=workers)
                    rows.append(
                        (codec, f"eval_loader, {workers} workers", *rate(loader, limit, lambda b: len(b["labels"])))
                    )
    base = {codec: per_s for codec, name, per_s, _ in rows if name.startswith("raw tar read")}
    first = rows[0][2]
    print(
        f"{'codec':6s} {'path':40s} {'samples/s':>10s} {'samples':>8s} {'of its raw read':>15s} "
        f"{'of ' + rows[0][0] + ' raw read':>16s}"
    )
    for codec, name, per_s, seen in rows:
        print(
            f"{codec:6s} {name:40s} {per_s:10,.0f} {seen:8,d} {100 * per_s / base[codec]:14.0f}% "
            f"{100 * per_s / first:15.0f}%"
        )
    print(f"load average now {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
