"""The frozen-feature cache (clipit/training/features.py): backbone forwards and probe-stage time, both ways.

    python bench/bench_feature_cache.py                  # paper-grid counts + the demo-tiny probe stage, 3 seeds
    python bench/bench_feature_cache.py --seeds 2 --epochs 5

Part 1 (exact counts, nothing runs): the warm-start stage of configs/grids/paper_table1.yaml, i.e. every
unimodal probe cell, as `clipit grid --dry-run` prices it (clipit/hpc/cost.py): images through a backbone
with `feature_cache: false` (every step and every validation runs the frozen backbone) and with the cache
(one pass over train + val per backbone and dataset, shared by the seeds; the test pass stays per cell).

Part 2 (measured, the baseline in the same run): the probe stage of the tiny demo (demo-vit-tiny, its
own shards built here into a temporary folder) trained for every seed online and then cached, through the
real `clipit train` CLI. The backbone's weights come from a file (`model.weights`), as pretrained ones do,
so every seed runs the same backbone (a random init would differ per seed, and so would its cache). Each run's train_summary.json records the images its process ran through a
backbone (`backbone_forwards`); the wall time is the whole stage (all seeds, process start included).
The test metrics of each seed are compared (the stated tolerance of tests/training/test_feature_cache.py:
balanced accuracy equal, test loss within 1e-4).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clipit.hpc.cost import grid_cost  # noqa: E402
from clipit.hpc.grid import expand  # noqa: E402

GRID = ROOT / "configs" / "grids" / "paper_table1.yaml"
TINY = "configs/demo-tiny.yaml"


def warm_start_forwards(grid: Path) -> tuple[int, int, int]:
    """(cells, images through a backbone online, with the cache) over the grid's unimodal cells."""
    plan = expand(grid, [])
    stages = [s for s in grid_cost(plan) if "method=unimodal," in s.label]  # cell keys: axis=value,...
    return len(stages), sum(s.images(False) for s in stages), sum(s.images(True) for s in stages)


def backbone_weights(path: Path) -> Path:
    """A demo-vit-tiny backbone's random weights as a file (what a pretrained checkpoint is to a real run)."""
    import torch
    from safetensors.torch import save_file

    from clipit.models.backbones import build_backbone

    torch.manual_seed(0)
    backbone, _ = build_backbone("demo-vit-tiny", weights="random")
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(path))
    return path


def clipit(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "clipit", *args], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"`clipit {' '.join(args)}` failed:\n{proc.stderr[-2000:]}")


def probe_stage(out: Path, shared: list[str], seeds: list[int], cache: bool) -> tuple[float, list[dict]]:
    """(wall seconds of the stage, per seed: summary + metrics) for the unimodal probe of every seed."""
    sets = [*shared, f"output_dir={out}", f"methods.unimodal.feature_cache={str(cache).lower()}"]
    start = time.perf_counter()
    for seed in seeds:
        clipit(
            "train",
            "--config",
            TINY,
            "--method",
            "unimodal",
            "--seed",
            str(seed),
            *[a for s in sets for a in ("--set", s)],
        )
    wall = time.perf_counter() - start
    runs = []
    for seed in seeds:
        run = out / "runs" / "unimodal" / f"seed-{seed}"
        runs.append(
            {
                "summary": json.loads((run / "train_summary.json").read_text()),
                "metrics": json.loads((run / "metrics.json").read_text()),
            }
        )
    return wall, runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()

    cells, online, cached = warm_start_forwards(GRID)
    print(
        f"paper_table1 warm-start stage ({cells} unimodal cells): {online:,} images through a backbone without "
        f"the cache, {cached:,} with it: {online / cached:.1f}x fewer"
    )

    seeds = list(range(args.seeds))
    with tempfile.TemporaryDirectory(prefix="clipit-bench-cache-") as tmp:
        base = Path(tmp) / "base"
        shared = [f"output_dir={base}", f"methods.unimodal.epochs={args.epochs}", "methods.unimodal.evals_per_epoch=2"]
        setup = [a for s in shared for a in ("--set", s)]
        clipit("pair", "--config", TINY, *setup)
        clipit("shard", "build", "--config", TINY, *setup)
        shared = [s for s in shared if not s.startswith("output_dir=")] + [
            f"shards.dir={base / 'shards'}",
            f"pairing.dir={base / 'pairing'}",
            f"model.weights={backbone_weights(Path(tmp) / 'backbone.safetensors')}",
        ]
        online_s, online_runs = probe_stage(Path(tmp) / "online", shared, seeds, cache=False)
        cached_s, cached_runs = probe_stage(Path(tmp) / "cached", shared, seeds, cache=True)

    print(
        f"\ndemo-tiny probe stage, {len(seeds)} seeds x {args.epochs} epochs, through `clipit train` "
        "(wall time includes process start):"
    )
    print(f"{'':<10} {'backbone forwards':>18} {'wall s':>8} {'test bal. acc (per seed)':>30}")
    for name, wall, runs in (("online", online_s, online_runs), ("cached", cached_s, cached_runs)):
        forwards = sum(r["summary"]["backbone_forwards"] for r in runs)
        accs = ", ".join(f"{r['metrics']['balanced_accuracy']:.4f}" for r in runs)
        print(f"{name:<10} {forwards:>18,} {wall:>8.1f} {accs:>30}")
    online_f = sum(r["summary"]["backbone_forwards"] for r in online_runs)
    cached_f = sum(r["summary"]["backbone_forwards"] for r in cached_runs)
    same = all(
        a["metrics"]["balanced_accuracy"] == b["metrics"]["balanced_accuracy"]
        and abs(a["metrics"]["loss"] - b["metrics"]["loss"]) <= 1e-4
        for a, b in zip(online_runs, cached_runs)
    )
    print(
        f"forwards: {online_f / cached_f:.1f}x fewer; stage time: {online_s / cached_s:.2f}x faster; "
        f"test metrics within tolerance for every seed: {same}"
    )


if __name__ == "__main__":
    main()
