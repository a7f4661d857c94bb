"""Pairing similarity step: clipit's exact top-1 search vs faiss-cpu IndexFlatIP, same process, same data.

    python bench/bench_pairing.py                      # N=100k images x M=10k reports x 512-d, top-1
    python bench/bench_pairing.py --n 20000 --m 1000 --repeats 3

Both sides get L2-normalised fp32 embeddings and must return the same top-1 indices. Reported:
seconds (best of --repeats, interleaved), queries/s, GFLOP/s (2·N·M·D), and each path's throughput as a ratio of
the faiss baseline. `auto` is what the pairing engine runs (pairing.search: auto).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clipit.pairing.search import choose_backend, topk_cosine


def best_of(repeats: int, fn):
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000, help="images (queries)")
    ap.add_argument("--m", type=int, default=10_000, help="reports (keys)")
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    import faiss

    gen = torch.Generator().manual_seed(args.seed)
    queries = torch.nn.functional.normalize(torch.randn(args.n, args.d, generator=gen), dim=1)
    keys = torch.nn.functional.normalize(torch.randn(args.m, args.d, generator=gen), dim=1)
    q_np, k_np = queries.numpy(), keys.numpy()
    flops = 2 * args.n * args.m * args.d
    print(
        f"N={args.n:,} x M={args.m:,} x D={args.d}, top-1, fp32 | torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), faiss {faiss.__version__} ({faiss.omp_get_max_threads()} threads), "
        f"{os.cpu_count()} cpus, load average {os.getloadavg()[0]:.1f}"
    )

    def faiss_baseline():
        index = faiss.IndexFlatIP(args.d)
        index.add(k_np)
        return index.search(q_np, 1)[1][:, 0]

    paths = {
        "faiss IndexFlatIP (baseline)": faiss_baseline,
        "clipit torch (chunked GEMM + max)": lambda: topk_cosine(queries, keys, k=1, backend="torch")[0][:, 0],
        "clipit faiss backend": lambda: topk_cosine(queries, keys, k=1, backend="faiss")[0][:, 0],
        f"clipit auto (-> {choose_backend('auto', args.m, torch.device('cpu'))})": lambda: topk_cosine(
            queries, keys, k=1, backend="auto"
        )[0][:, 0],
    }
    results = {}
    for _ in range(args.repeats):  # interleaved, so a change in machine load hits every path alike
        for name, fn in paths.items():
            seconds, idx = best_of(1, fn)
            if name not in results or seconds < results[name][0]:
                results[name] = (seconds, idx)
    base_s, base_idx = results["faiss IndexFlatIP (baseline)"]
    print(f"{'path':40s} {'seconds':>8s} {'queries/s':>10s} {'GFLOP/s':>8s} {'vs faiss':>9s}  same top-1")
    for name, (seconds, idx) in results.items():
        same = "yes" if np.array_equal(idx, base_idx) else f"NO ({int((idx != base_idx).sum())} differ)"
        print(
            f"{name:40s} {seconds:8.2f} {args.n / seconds:10,.0f} {flops / seconds / 1e9:8.1f} "
            f"{base_s / seconds:8.2f}x  {same}"
        )


if __name__ == "__main__":
    main()
