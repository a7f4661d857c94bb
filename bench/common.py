"""Shared helpers for the model benchmarks: the models built through clipit's own code paths
(build_classifier + prepare_finetune, as models.factory.build_model does) and an interleaved timer."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clipit.config import LoraConfig
from clipit.models.backbones import build_backbone
from clipit.models.clipit import prepare_finetune
from clipit.models.factory import build_classifier


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--backbone", default="kaiko-vits16", help="registry name; built with random weights")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--classes", type=int, default=2)
    p.add_argument("--text-dim", type=int, default=512)
    p.add_argument("--repeats", type=int, default=7, help="timed rounds (each times every variant once)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=8)
    p.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: process CPU time (with --threads 1 it ignores time spent descheduled on a busy machine)",
    )
    return p


def setup(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"# torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, backbone "
        f"{args.backbone} (random init), batch {args.batch_size}, {args.image_size} px, LoRA r{args.lora_r} "
        f"on Linear+Conv2d+Embedding, {args.clock} clock"
    )


def make(
    args, method: str, finetune: str, warm_head: bool, seed: int = 0, text_tower: torch.nn.Module | None = None
) -> torch.nn.Module:
    """One method's model with the same (seeded) backbone weights for every variant (CLIP-IT may get a
    trainable text tower, attached before LoRA as models.factory.build_model does)."""
    torch.manual_seed(seed)
    backbone, _ = build_backbone(args.backbone, weights="random", image_size=args.image_size)
    model = build_classifier(method, backbone, args.classes, args.text_dim, 1)
    if text_tower is not None:
        model.text_tower = text_tower
    prepare_finetune(model, finetune, LoraConfig(r=args.lora_r, alpha=args.lora_alpha), warm_head=warm_head)
    return model.to(args.device)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(fns: dict, repeats: int, warmup: int, device: str, clock: str = "wall") -> dict[str, list[float]]:
    """Round-robin timing: every round times each variant once, so drift hits all of them alike."""
    now = time.process_time if clock == "cpu" else time.perf_counter
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = now()
            fn()
            sync(device)
            times[name].append(now() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def count(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
