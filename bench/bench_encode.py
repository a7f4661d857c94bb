"""Image encoding for pairing: clipit's batched engine vs the reference code's per-image loop.

    python bench/bench_encode.py                         # 500 96-px H&E-like tiles, demo CLIP (64 px), CPU
    python bench/bench_encode.py --n 2000 --device cuda

Baseline (measured in this process): the reference pattern (ModalityPairing `map.py`): for every image,
decode + preprocess, `encode_image(x[None])`, normalise, similarity to all reports, then `.item()`,
which syncs device and host after every image. clipit: `pairing.engine.embed_images` (DataLoader
batches, one encode per batch, embeddings stay on the device) + one exact top-1 search. Both return
the top-1 report per image; the script checks they agree. Also reported: the encoder alone on
pre-decoded tensors (per-image calls vs batches), which isolates the batching gain from decoding.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clipit.data.base import decode_image
from clipit.data.demo import DEMO_CLASSES, write_demo_images
from clipit.data.folder import ImageFolderDataset
from clipit.pairing.encoders import PairingModel
from clipit.pairing.engine import embed_images
from clipit.pairing.search import topk_cosine


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def reference_loop(model, preprocess, dataset, split, text, device):
    """One image at a time, a host sync per image (what the reference pairing scripts do)."""
    n = dataset.split_size(split)
    idx, val = np.empty(n, np.int64), np.empty(n, np.float32)
    for i in range(n):
        x = preprocess(decode_image(dataset.sample(split, i).data))[None].to(device)
        v = model.encode_image(x)
        v = v / v.norm(dim=-1, keepdim=True)
        sims = v @ text.T
        idx[i] = sims.argmax().item()
        val[i] = sims.max().item()
    return idx, val


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=500, help="images")
    ap.add_argument("--m", type=int, default=1000, help="reports (random unit vectors)")
    ap.add_argument("--tile", type=int, default=96, help="stored tile size (PCAM: 96)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=1, help="DataLoader workers for the batched path")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--data", type=Path, help="where to write the tiles (default: a temp dir)")
    ap.add_argument("--threads", type=int, help="torch intra-op threads for every path (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import open_clip

    from clipit.pairing.demo_clip import register_demo_clip

    device = torch.device(args.device)
    torch.manual_seed(0)
    arch = register_demo_clip()
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None)
    model = model.eval().to(device)
    pm = PairingModel("bench", model, preprocess, open_clip.get_tokenizer(arch), {"model": arch}, device)
    text = torch.nn.functional.normalize(torch.randn(args.m, 512, generator=torch.Generator().manual_seed(1)), dim=1)
    text = text.to(device)
    with tempfile.TemporaryDirectory() as tmp:
        root = write_demo_images(args.data or Path(tmp) / "tiles", {"train": args.n}, size=args.tile, seed=0)
        dataset = ImageFolderDataset(root, splits=("train",), classes=DEMO_CLASSES)
        print(
            f"{args.n} x {args.tile}-px PNG tiles -> {arch} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
            f"params, 64-px input), M={args.m} reports | device {device}, {torch.get_num_threads()} threads, "
            f"{os.cpu_count()} cpus, load average {os.getloadavg()[0]:.1f}"
        )

        def batched(workers):
            images = embed_images(pm, dataset, "train", batch_size=args.batch_size, num_workers=workers)
            return topk_cosine(images, text, k=1, backend="torch")

        def reference(threads):
            default = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                return reference_loop(model, preprocess, dataset, "train", text, device)
            finally:
                torch.set_num_threads(default)

        threads = torch.get_num_threads()
        # warm-up (allocator, thread pools)
        reference_loop(model, preprocess, ImageSubset(dataset, 8), "train", text, device)
        embed_images(pm, ImageSubset(dataset, 8), "train", batch_size=8)
        rows = []
        ref_s, (ref_idx, _) = timed(lambda: reference(threads), device)
        rows.append((f"reference: per-image loop + sync, {threads} threads (baseline)", ref_s, ref_s))
        if device.type == "cpu" and threads > 1:
            ref1_s, _ = timed(lambda: reference(1), device)
            rows.append(("reference: per-image loop + sync, 1 thread (its best here)", ref1_s, ref_s))
        agree = []
        for workers in sorted({0, args.workers}):
            ours_s, (idx, _) = timed(lambda: batched(workers), device)
            agree.append(float((idx[:, 0] == ref_idx).mean()))
            rows.append((f"clipit: batched engine (batch {args.batch_size}, {workers} workers) + top-1", ours_s, ref_s))

        # the encoder alone, on pre-decoded tensors
        x = torch.stack([preprocess(decode_image(dataset.sample("train", i).data)) for i in range(args.n)]).to(device)
        with torch.no_grad():
            per_s, _ = timed(lambda: [model.encode_image(x[i : i + 1]).norm().item() for i in range(args.n)], device)
            bat_s, _ = timed(
                lambda: (
                    torch.cat(
                        [model.encode_image(x[i : i + args.batch_size]) for i in range(0, args.n, args.batch_size)]
                    )
                    .norm()
                    .item()
                ),
                device,
            )
        rows += [
            (f"encoder only: per-image calls with .item(), {threads} threads (baseline)", per_s, per_s),
            (f"encoder only: batches of {args.batch_size}", bat_s, per_s),
        ]
    print(f"{'path':66s} {'seconds':>8s} {'images/s':>9s} {'vs baseline':>11s}")
    for name, seconds, base in rows:
        print(f"{name:66s} {seconds:8.2f} {args.n / seconds:9.0f} {base / seconds:10.1f}x")
    print(
        f"same top-1 report as the reference loop: {', '.join(f'{100 * a:.2f}%' for a in agree)} of images; "
        f"load average now {os.getloadavg()[0]:.1f}"
    )


class ImageSubset(ImageFolderDataset):
    """The first n images of a folder dataset (for warm-up)."""

    def __init__(self, base: ImageFolderDataset, n: int):
        self.__dict__.update(base.__dict__)
        self._files = {s: f[:n] for s, f in base._files.items()}


if __name__ == "__main__":
    main()
