"""GPU readiness check on one GPU (< 8 minutes on an H100/H200): one table of what a launch will get.

    make gpu-check                                   # = python bench/gpu_check.py --out runs/gpu-check.md
    python bench/gpu_check.py --dry-run --out /tmp/gpu-check.md   # every section at tiny sizes on CPU
    python bench/gpu_check.py --sections train search --peak-tflops 989

Sections (random init everywhere: no weights needed):
  train   a LoRA CLIP-IT training step (clipit's own model assembly: build_backbone + build_classifier +
          prepare_finetune, as models.factory.build_model) in bf16 for ViT-S/16, ViT-B/16 and ViT-L/16
          (UNI-size), text tower (CONCH's, + LoRA) off and on: images/s and MFU (FLOPs of one step from
          torch.utils.flop_counter.FlopCounterMode; peak from PEAK_TFLOPS by device name, or
          --peak-tflops); with the tower off also the frozen forward (probe / evaluation / feature cache)
  ddp     the tiny demo's LoRA probe trained by `torchrun --nproc_per_node 1` with DDP and with DeepSpeed
          ZeRO-2 (methods.<m>.distributed), fp32: both must end with the same test metrics
  conch   the CONCH-architecture image encoder at 448 px (the pairing stage's PairingModel) in images/s,
          and its text encoder in reports/s
  search  top-k search on the GPU (torch.topk on a normalised matmul, clipit/pairing/search.py) vs faiss-cpu
  loader  the shard loader's samples/s with all of the node's cores, raw and png codecs (bench_shard_read.py)
Without CUDA (or with --dry-run) every section runs at tiny sizes on the CPU, so the script cannot rot
(tests/bench/test_gpu_check.py). --out FILE.md writes the table; FILE.json next to it holds the numbers
that `clipit grid --dry-run` uses for its cost (clipit/hpc/throughput.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import make, sync

from clipit.models.clipit import clipit_loss

ROOT = Path(__file__).resolve().parents[1]
# dense bf16 tensor-core peak per GPU, TFLOP/s (vendor data sheets); the first name contained in
# torch.cuda.get_device_name() wins, so the more specific names come first
PEAK_TFLOPS = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200", 989.4),
    ("H100", 989.4),
    ("GH200", 989.4),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10", 125.0),
]
BACKBONES = [("ViT-S/16", "kaiko-vits16"), ("ViT-B/16", "kaiko-vitb16"), ("ViT-L/16 (UNI)", "uni")]
SECTIONS = ("train", "ddp", "conch", "search", "loader")


def peak_flops(device: str, override: float | None) -> float | None:
    if override:
        return override * 1e12
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    return next((tf * 1e12 for key, tf in PEAK_TFLOPS if key in name), None)


def autocast(device: str):
    return torch.autocast("cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16)


def timed(fn, steps: int, warmup: int, device: str) -> float:
    """Seconds per call (median of `steps` calls after `warmup`)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def counted_flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def conch_coca(tiny: bool):
    """CONCH's CoCa (conch_ViT-B-16 config, random init); tiny: 2 narrow layers per tower, 32 px."""
    from clipit.pairing import encoders

    cfg = encoders.conch_config()
    if tiny:
        cfg["vision_cfg"] |= dict(image_size=32, layers=2, width=64, num_heads=2, n_queries_caption=4)
        cfg["text_cfg"] |= dict(layers=2, width=64, heads=2)
        cfg["multimodal_cfg"] |= dict(layers=1, width=64, heads=2)
        cfg["embed_dim_caption"] = 64
    return encoders._import_conch().CoCa(**cfg)


def conch_tower(tiny: bool):
    from clipit.pairing import encoders
    from clipit.pairing.text_tower import text_tower_from

    pairing = encoders.ConchPairingModel("conch", conch_coca(tiny), None, encoders.conch_tokenizer(), {})
    return text_tower_from(pairing, copy=False)


# ---------------------------------------------------------------------------------------------
# Sections


def section_train(args, peak) -> list[dict]:
    rows = []
    report = "Invasive ductal carcinoma of the left breast, grade 2, with desmoplastic stroma. " * 20
    for label, name in BACKBONES:
        name = name + "-tiny" if args.tiny else name
        for tower_on in (False, True):
            opts = argparse.Namespace(
                backbone=name, image_size=None, classes=2, text_dim=512, lora_r=16, lora_alpha=8, device=args.device
            )
            tower = conch_tower(args.tiny) if tower_on else None
            model = make(opts, "clipit", "lora", warm_head=True, text_tower=tower).train()
            size = model.backbone.patch_embed.img_size[0] if hasattr(model.backbone, "patch_embed") else 224
            g = torch.Generator().manual_seed(0)
            images = torch.randn(args.batch_size, 3, size, size, generator=g).to(args.device)
            labels = torch.randint(0, 2, (args.batch_size,), generator=g).to(args.device)
            text = F.normalize(torch.randn(args.batch_size, 512, generator=g), dim=1).to(args.device)
            extra = {}
            if tower is not None:  # a distinct report per sample: the worst case
                extra["tokens"] = tower.tokenize([f"Case {i}. {report}" for i in range(args.batch_size)]).to(
                    args.device
                )
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=1e-4, fused=args.device.startswith("cuda") or None)

            def step():
                with autocast(args.device):
                    out = model(images, text, **extra)
                clipit_loss(out, labels, text, lam=1.0)["loss"].backward()
                torch.nn.utils.clip_grad_norm_(params, 0.5)
                opt.step()
                opt.zero_grad(set_to_none=True)

            flops = counted_flops(step)
            seconds = timed(step, args.steps, args.warmup, args.device)
            row = {
                "backbone": name,
                "label": label,
                "text_tower": tower_on,
                "batch": args.batch_size,
                "px": size,
                "images_per_s": args.batch_size / seconds,
                "step_flops": flops,
                "mfu": flops / seconds / peak if peak else None,
            }
            if not tower_on:
                model.eval()

                @torch.inference_mode()
                def forward():
                    with autocast(args.device):
                        model.backbone(images)

                fwd_flops = counted_flops(forward)
                fwd_s = timed(forward, args.steps, args.warmup, args.device)
                row |= {
                    "forward_images_per_s": args.batch_size / fwd_s,
                    "forward_mfu": fwd_flops / fwd_s / peak if peak else None,
                }
            rows.append(row)
            print(
                f"[train] {label} tower {'on' if tower_on else 'off'}: {row['images_per_s']:,.1f} images/s", flush=True
            )
            model = tower = opt = None  # free the GPU memory before the next backbone
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
    return rows


def section_ddp(args) -> dict:
    """The tiny demo's LoRA probe under torchrun (1 process) with DDP and ZeRO-2; same metrics expected."""
    work = Path(tempfile.mkdtemp(prefix="gpu-check-ddp-"))
    base = ["--config", "configs/demo-tiny.yaml", "--set", f"output_dir={work}"]
    subprocess.run(
        [sys.executable, "-m", "clipit", "shard", "build", *base], cwd=ROOT, check=True, capture_output=True, text=True
    )
    results = {}
    for name in ("ddp", "zero2"):
        out = work / name
        sets = [
            f"output_dir={out}",
            f"shards.dir={work / 'shards'}",
            f"pairing.dir={work / 'pairing'}",
            f"data.root={work / 'data' / 'images'}",
            f"reports.path={work / 'data' / 'reports.jsonl'}",
            f"pairing.checkpoint={work / 'demo-clip' / 'model.safetensors'}",
            "methods.unimodal.finetune=lora",
            "methods.unimodal.epochs=1",
            "methods.unimodal.precision=fp32",
            f"methods.unimodal.distributed={name}",
        ]
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "1",
            "-m",
            "clipit",
            "train",
            "--config",
            "configs/demo-tiny.yaml",
            "--method",
            "unimodal",
            "--seed",
            "0",
        ]
        start = time.perf_counter()
        proc = subprocess.run(cmd + [a for s in sets for a in ("--set", s)], cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"gpu-check ddp section: {name} run failed:\n{proc.stderr[-3000:]}")
        metrics = json.loads((out / "runs" / "unimodal" / "seed-0" / "metrics.json").read_text())
        results[name] = {
            "balanced_accuracy": metrics["balanced_accuracy"],
            "accuracy": metrics["accuracy"],
            "wall_s": time.perf_counter() - start,
        }
    diff = abs(results["ddp"]["balanced_accuracy"] - results["zero2"]["balanced_accuracy"])
    # one process, same data and seed: equal up to float order (GPU atomics); 0.01 = one test sample of 128
    return results | {"same_metrics": diff <= 0.01, "balanced_accuracy_diff": diff}


def section_conch(args) -> dict:
    from clipit.pairing import encoders

    coca = conch_coca(args.tiny)
    size = coca.visual.trunk.patch_embed.img_size[0]
    model = encoders.ConchPairingModel(
        "conch", coca, None, encoders.conch_tokenizer(), {}, args.device, precision="bf16"
    )
    batch = args.batch_size
    images = torch.randn(batch, 3, size, size, device=args.device)
    image_s = timed(lambda: model.encode_images(images), args.steps, args.warmup, args.device)
    tokens = model.tokenize([f"Report {i}: invasive carcinoma with stroma. " * 12 for i in range(batch)]).to(
        args.device
    )
    text_s = timed(lambda: model.model.encode_text(tokens), args.steps, args.warmup, args.device)
    return {"px": size, "batch": batch, "images_per_s": batch / image_s, "texts_per_s": batch / text_s}


def section_search(args) -> dict:
    from clipit.pairing.search import faiss_available, topk_cosine

    n, m = (args.search_images, args.search_texts)
    g = torch.Generator().manual_seed(0)
    queries, keys = torch.randn(n, 512, generator=g), torch.randn(m, 512, generator=g)
    out = {"images": n, "texts": m, "k": 5}
    start = time.perf_counter()
    torch_idx, _ = topk_cosine(queries, keys, k=5, device=args.device, backend="torch")
    sync(args.device)
    out["torch_s"] = time.perf_counter() - start
    out["torch_device"] = args.device
    if faiss_available():
        start = time.perf_counter()
        faiss_idx, _ = topk_cosine(queries, keys, k=5, device="cpu", backend="faiss")
        out["faiss_cpu_s"] = time.perf_counter() - start
        out["top1_agreement"] = float((torch_idx[:, 0] == faiss_idx[:, 0]).mean())
    return out


def section_loader(args) -> dict:
    """train_loader samples/s over bench_shard_read.py's 96-px shards, per codec (raw: what shards.codec auto
    gives pcam, crc and bach; png: folder datasets), with every core of the node as a worker."""
    from bench_shard_read import build_shards, rate

    from clipit.data.demo import DEMO_CLASSES, write_demo_images
    from clipit.data.folder import ImageFolderDataset
    from clipit.shards.manifest import shard_count
    from clipit.training.loader import train_loader

    workers = os.cpu_count() or 1
    total = args.loader_shards * args.loader_per_shard
    bs = min(256, args.loader_per_shard)
    out = {"workers": workers}
    with tempfile.TemporaryDirectory() as tmp:
        images = write_demo_images(Path(tmp) / "tiles", {"train": total}, size=96, seed=0)
        dataset = ImageFolderDataset(images, splits=("train",), classes=DEMO_CLASSES)
        for codec in ("raw", "png"):
            urls, _ = build_shards(dataset, Path(tmp) / f"shards-{codec}", args.loader_per_shard, codec)
            counts = [shard_count(total, args.loader_per_shard, i) for i in range(len(urls))]
            loader = train_loader(urls, counts, bs, seed=0, num_workers=workers)
            out[codec], _ = rate(loader, (total // bs) * bs, lambda b: len(b["labels"]))
    return out | {"samples_per_s": out["raw"]}


# ---------------------------------------------------------------------------------------------
# Report


def table(results: dict) -> list[str]:
    lines = [
        f"# gpu-check: {results['device']}{' (dry run, tiny sizes: not a measurement)' if results['dry_run'] else ''}",
        "",
        f"`{results['command']}`; torch {torch.__version__}; peak {results['peak_flops'] / 1e12:.1f} TFLOP/s dense bf16"
        if results["peak_flops"]
        else f"`{results['command']}`; torch {torch.__version__}; no peak FLOP/s known (MFU n/a)",
        "",
        "| section | configuration | result |",
        "|---|---|---|",
    ]
    pct = lambda x: f"{100 * x:.1f}%" if x else "n/a"  # noqa: E731
    for r in results.get("train_step", []):
        conf = (
            f"{r['label']} ({r['backbone']}), {r['px']} px, batch {r['batch']}, bf16, LoRA, text tower "
            f"{'on (CONCH + LoRA)' if r['text_tower'] else 'off (cached)'}"
        )
        lines.append(f"| train step | {conf} | {r['images_per_s']:,.1f} images/s, MFU {pct(r['mfu'])} |")
        if "forward_images_per_s" in r:
            lines.append(
                f"| frozen forward | {r['label']}, bf16, inference | {r['forward_images_per_s']:,.1f} "
                f"images/s, MFU {pct(r['forward_mfu'])} |"
            )
    if "ddp_zero2" in results:
        d = results["ddp_zero2"]
        lines.append(
            f"| torchrun 1 process | demo-tiny LoRA probe, fp32: DDP vs DeepSpeed ZeRO-2 | balanced accuracy "
            f"{d['ddp']['balanced_accuracy']:.4f} vs {d['zero2']['balanced_accuracy']:.4f}: "
            f"{'same' if d['same_metrics'] else 'DIFFERENT'} ({d['ddp']['wall_s']:.0f} s / "
            f"{d['zero2']['wall_s']:.0f} s) |"
        )
    if "conch" in results:
        c = results["conch"]
        lines.append(
            f"| pairing encoder | CONCH image encoder, {c['px']} px, batch {c['batch']}, bf16 | "
            f"{c['images_per_s']:,.1f} images/s; text encoder {c['texts_per_s']:,.1f} reports/s |"
        )
    if "search" in results:
        s = results["search"]
        faiss = (
            (
                f"; faiss-cpu {s['faiss_cpu_s']:.2f} s ({s['faiss_cpu_s'] / s['torch_s']:.1f}x), top-1 agreement "
                f"{100 * s['top1_agreement']:.1f}%"
            )
            if "faiss_cpu_s" in s
            else "; faiss-cpu not installed"
        )
        lines.append(
            f"| top-k search | {s['images']:,} x {s['texts']:,} x 512, k {s['k']} | torch on "
            f"{s['torch_device']} {s['torch_s']:.2f} s{faiss} |"
        )
    if "loader" in results:
        lo = results["loader"]
        lines.append(
            f"| shard loader | 96-px tiles, {lo['workers']} workers | raw {lo['raw']:,.0f} samples/s, png "
            f"{lo['png']:,.0f} samples/s |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="write the table here (Markdown) and the numbers next to it (.json)")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU, a few steps (also without CUDA)")
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    ap.add_argument("--peak-tflops", type=float, help="peak dense bf16 TFLOP/s per GPU (default: by device name)")
    ap.add_argument("--batch-size", type=int, help="default 64 (the paper configs' batch), 4 in a dry run")
    ap.add_argument("--steps", type=int, help="timed steps per configuration (default 10, 2 in a dry run)")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.dry_run
    args.tiny = not cuda
    args.device = "cuda" if cuda else "cpu"
    args.batch_size = args.batch_size or (64 if cuda else 4)
    args.steps, args.warmup = args.steps or (10 if cuda else 2), 3 if cuda else 1
    args.search_images, args.search_texts = (262_144, 10_000) if cuda else (2_000, 500)
    args.loader_shards, args.loader_per_shard = (16, 1000) if cuda else (2, 64)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 parts (heads, loss) as a launch would run them
    peak = peak_flops(args.device, args.peak_tflops)
    device_name = torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores)"
    results = {
        "device": device_name,
        "dry_run": not cuda,
        "peak_flops": peak,
        "command": " ".join(["python bench/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    start = time.perf_counter()
    if "train" in args.sections:
        results["train_step"] = section_train(args, peak)
    if "conch" in args.sections:
        results["conch"] = section_conch(args)
        results["conch_images_per_s"] = results["conch"]["images_per_s"]
    if "search" in args.sections:
        results["search"] = section_search(args)
    if "loader" in args.sections:
        results["loader"] = section_loader(args)
        results["loader_samples_per_s"] = results["loader"]["samples_per_s"]
    if "ddp" in args.sections:
        results["ddp_zero2"] = section_ddp(args)
    results["wall_s"] = time.perf_counter() - start
    lines = table(results) + ["", f"wall time {results['wall_s']:.0f} s"]
    print("\n".join(lines))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
        args.out.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    return 1 if results.get("ddp_zero2", {}).get("same_metrics") is False else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
