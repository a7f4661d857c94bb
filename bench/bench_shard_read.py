"""Shard read + decode throughput of the training loader (clipit/training/loader.py), 96-px tiles.

    python bench/bench_shard_read.py                     # 8 shards x 1,000 samples, 8,000 samples per path
    python bench/bench_shard_read.py --shards 16 --workers 0 2 4

Shards are written by clipit's own writer from H&E-like 96-px PNG tiles (the demo generator, the size
of PCAM patches) with a 512-d fp16 embedding per sample, like real shards. Baselines measured in this
process: raw tar iteration without decoding (an upper bound for any reader), and webdataset's stock
`.decode("rgb8")` + default batch collation (the naive pipeline). clipit's train loader (resampled,
shuffled, uint8 batches collated with np.stack) and eval loader are timed with 0..N workers; the
goal is >= 1,500 samples/s on 2 cores.
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

import webdataset as wds  # noqa: E402

from clipit.data.demo import DEMO_CLASSES, write_demo_images  # noqa: E402
from clipit.data.folder import ImageFolderDataset  # noqa: E402
from clipit.shards.format import write_split_shards  # noqa: E402
from clipit.training.loader import eval_loader, train_loader  # noqa: E402


def build_shards(root: Path, n_shards: int, per_shard: int, tile: int) -> tuple[list[str], float]:
    """(shard paths, seconds spent writing them: read + decode-check + tar + fsync, one process)."""
    n = n_shards * per_shard
    images = write_demo_images(root / "tiles", {"train": n}, size=tile, seed=0)
    dataset = ImageFolderDataset(images, splits=("train",), classes=DEMO_CLASSES)
    rng = np.random.default_rng(0)
    text = rng.normal(size=(300, 512)).astype(np.float32)
    pairs = {"indices": rng.integers(0, 300, (n, 1)), "scores": rng.random((n, 1)).astype(np.float32)}
    start = time.perf_counter()
    paths = write_split_shards(dataset, "train", pairs, text, [f"R{i}" for i in range(300)], root / "shards", per_shard)
    return [str(p) for p in paths], time.perf_counter() - start


def rate(iterable, limit: int, count) -> tuple[float, int]:
    """Steady-state samples per second: the clock starts after the first item (worker start-up and
    shuffle-buffer fill excluded) and runs until `limit` samples in all (batches counted by `count`)."""
    it = iter(iterable)
    seen = count(next(it))
    start, timed = time.perf_counter(), 0
    for item in it:
        timed += count(item)
        if seen + timed >= limit:
            break
    return timed / (time.perf_counter() - start), seen + timed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--per-shard", type=int, default=1000)
    ap.add_argument("--tile", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--samples", type=int, help="samples per path (default: all of them)")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--dir", type=Path, help="keep the shards here (default: a temp dir)")
    args = ap.parse_args()
    total = args.shards * args.per_shard
    limit = args.samples or total
    bs = args.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        root = args.dir or Path(tmp)
        urls, write_s = build_shards(root, args.shards, args.per_shard, args.tile)
        size = sum(os.path.getsize(u) for u in urls)
        print(f"{len(urls)} shards x {args.per_shard} samples ({args.tile}-px PNG + cls + 512-d fp16 emb + json), "
              f"{size / total / 1024:.1f} KiB/sample; written by clipit.shards.format in one process at "
              f"{total / write_s:,.0f} samples/s (decode-check + fsync included) | {os.cpu_count()} cpus, "
              f"load average {os.getloadavg()[0]:.1f}")
        rows = []
        raw = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None)
        rows.append(("raw tar read, no decode (upper bound)", *rate(raw, limit, lambda s: 1)))
        naive = (wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None)
                 .decode("rgb8").to_tuple("png", "cls", "emb.npy").batched(bs))
        naive_limit = min(limit, 8 * bs)  # it is slow: a few batches are enough for its rate
        rows.append(("webdataset decode('rgb8') + default collation (baseline)", *rate(naive, naive_limit, lambda b: len(b[1]))))
        for workers in args.workers:
            batches = -(-limit // bs)
            loader = train_loader(urls, bs, batches, seed=0, num_workers=workers)
            rows.append((f"clipit train_loader, {workers} workers", *rate(loader, batches * bs, lambda b: len(b["labels"]))))
            loader = eval_loader(urls, bs, num_workers=workers)
            rows.append((f"clipit eval_loader, {workers} workers", *rate(loader, limit, lambda b: len(b["labels"]))))
    base = rows[1][1]
    upper = rows[0][1]
    print(f"{'path':58s} {'samples/s':>10s} {'samples':>8s} {'vs baseline':>11s} {'of raw read':>11s}")
    for name, per_s, seen in rows:
        print(f"{name:58s} {per_s:10,.0f} {seen:8,d} {per_s / base:10.1f}x {100 * per_s / upper:10.0f}%")
    print(f"load average now {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
