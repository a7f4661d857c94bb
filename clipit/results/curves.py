"""Training curves of `clipit report`: train loss and validation balanced accuracy vs optimizer step, read
from each run's TensorBoard files, mean over seeds with a ± std band.

A run that warm-starts from another (CLIP-IT from the unimodal probe of the same seed) continues the
step axis where its warm start ended: its steps are shifted by the warm start's last logged step (mean
over seeds), so that the probe and CLIP-IT read as one training. Per dataset one figure of the main runs;
per dataset and backbone with ablation variants one more, every variant drawn beside the probe and
CLIP-IT (full).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from clipit import layout
from clipit.methods import known_spec
from clipit.results.plots import GREY, NO_BACKBONE, backbone_colors, line_style, save
from clipit.results.runs import (
    BACKBONE_NAMES,
    DATASET_NAMES,
    MAIN_VARIANTS,
    Run,
    has_images,
    kind_order,
    method_label,
    order,
)

TAGS = ("train/loss", "val/balanced_accuracy")


def read_scalars(tb_dir: Path, tags: tuple[str, ...]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    have = set(acc.Tags().get("scalars", []))
    out = {}
    for tag in tags:
        if tag in have:
            events = acc.Scalars(tag)
            out[tag] = (np.array([e.step for e in events]), np.array([e.value for e in events], dtype=float))
    return out


def _mean_curve(curves: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps, mean, std) over seeds at the steps every seed logged (the same config logs the same steps);
    std is 0 for a single seed."""
    common = curves[0][0]
    for steps, _ in curves[1:]:
        common = np.intersect1d(common, steps)
    if len(common) == 0:
        return curves[0][0], curves[0][1], np.zeros_like(curves[0][1])
    values = np.array([[dict(zip(s, v))[c] for c in common] for s, v in curves])
    return common, values.mean(axis=0), values.std(axis=0, ddof=1) if len(values) > 1 else np.zeros(len(common))


def _scalars(runs: list[Run]) -> dict[Path, dict]:
    """Each run's TensorBoard scalars (runs without readable event files left out: no curve to draw)."""
    out = {}
    for r in runs:
        tb = layout.tensorboard_dir(r.path)
        if not tb.is_dir():
            continue
        try:
            out[r.path] = read_scalars(tb, TAGS)
        except Exception:  # a torn or foreign event file: the figure goes without this run
            continue
    return out


def _last_step(scalars: dict) -> int:
    return int(max((steps.max() for steps, _ in scalars.values() if len(steps)), default=0))


def warm_start_offsets(runs: list[Run], scalars: dict[Path, dict]) -> dict[Path, int]:
    """{run path: the last logged step of the run it warm-started from} (same backbone, dataset and seed;
    a variant reuses the main run's probe); runs without a warm start, or whose warm start logged nothing,
    are absent (offset 0)."""
    offsets = {}
    for r in runs:
        if not r.warm_start:
            continue
        warm = [
            w
            for w in runs
            if w is not r
            and (w.method == r.warm_start or w.kind == r.warm_start)
            and (w.backbone, w.dataset, w.seed) == (r.backbone, r.dataset, r.seed)
            and (w.variant == r.variant or w.variant in MAIN_VARIANTS)
            and w.path in scalars
        ]
        warm.sort(key=lambda w: w.variant != r.variant)  # its own variant's probe first, else the main one
        if warm:
            offsets[r.path] = _last_step(scalars[warm[0].path])
    return offsets


def _draw_group(axes, items: list[Run], scalars, offsets, color, ls, label) -> None:
    """Mean ± std over the seeds of one group, shifted by their warm starts' mean last step."""
    shift = int(round(np.mean([offsets.get(r.path, 0) for r in items])))
    for ax, tag, scale in ((axes[0], TAGS[0], 1.0), (axes[1], TAGS[1], 100.0)):
        curves = [scalars[r.path][tag] for r in items if tag in scalars[r.path]]
        if not curves:
            continue
        steps, values, spread = _mean_curve(curves)
        steps = steps + shift
        if len(curves) > 1:  # the seed band: mean ± std
            ax.fill_between(steps, scale * (values - spread), scale * (values + spread), color=color, alpha=0.15, lw=0)
        ax.plot(steps, scale * values, color=color, ls=ls, lw=1.6, marker="." if len(steps) < 30 else None, label=label)


def _finish(fig, axes, title: str, path: Path) -> list[Path]:
    axes[0].set_title("training loss")
    axes[0].set_ylabel("loss (CE + λ·KD for CLIP-IT)")
    axes[1].set_title("validation balanced accuracy")
    axes[1].set_ylabel("%")
    for ax in axes:
        ax.set_xlabel("optimizer step (a warm-started run continues after its warm start)")
    handles, labels = axes[1].get_legend_handles_labels()
    if not handles:
        handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.suptitle(title)
    fig.tight_layout()
    return save(fig, path)


def training_curves(runs: list[Run], out: Path) -> list[Path]:
    """curves-<dataset> (main runs) and curves-<dataset>-<backbone>-ablations (every variant) as PNG, PDF
    and SVG."""
    scalars = _scalars(runs)
    drawn = [r for r in runs if r.path in scalars]
    offsets = warm_start_offsets(runs, scalars)
    paths = []
    for d in order({r.dataset for r in drawn}, DATASET_NAMES):
        mine = [r for r in drawn if r.dataset == d]
        groups: dict[tuple, list[Run]] = {}
        for r in mine:
            if r.variant in MAIN_VARIANTS:
                groups.setdefault((r.backbone if has_images(r.kind) else NO_BACKBONE, r.kind), []).append(r)
        if groups:
            backbones = order({k[0] for k in groups}, BACKBONE_NAMES | {NO_BACKBONE: NO_BACKBONE})
            colors = backbone_colors([b for b in backbones if b != NO_BACKBONE]) | {NO_BACKBONE: GREY}
            fig, axes = plt.subplots(1, 2, figsize=(10.5, 3.9))
            kinds = kind_order({k for _, k in groups})
            for (b, kind), items in sorted(
                groups.items(), key=lambda kv: (backbones.index(kv[0][0]), kinds.index(kv[0][1]))
            ):
                label = f"{BACKBONE_NAMES.get(b, b)} {method_label(kind)}" if b != NO_BACKBONE else method_label(kind)
                _draw_group(axes, items, scalars, offsets, colors[b], line_style(kind), label)
            n_seeds = max(len({r.seed for r in v}) for v in groups.values())
            title = f"{DATASET_NAMES.get(d, d)}: training curves (mean over up to {n_seeds} seeds, band ± std)"
            paths += _finish(fig, axes, title, out / f"curves-{d}.png")
        for b in order({r.backbone for r in mine if r.variant not in MAIN_VARIANTS}, BACKBONE_NAMES):
            paths += _ablation_curves([r for r in mine if r.backbone == b], scalars, offsets, d, b, out)
    return paths


def _ablation_curves(runs: list[Run], scalars, offsets, d: str, b: str, out: Path) -> list[Path]:
    """One backbone and dataset: the main runs (black) and every variant (its own colour)."""
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        groups.setdefault((r.variant if r.variant not in MAIN_VARIANTS else "", r.kind), []).append(r)
    variants = sorted({v for v, _ in groups if v})
    cmap = plt.get_cmap("tab20")
    colors = {v: cmap(i % 20) for i, v in enumerate(variants)} | {"": (0, 0, 0, 1)}
    fig, axes = plt.subplots(1, 2, figsize=(11.5, 4.2))
    kinds = kind_order({k for _, k in groups})
    for (variant, kind), items in sorted(groups.items(), key=lambda kv: (kv[0][0], kinds.index(kv[0][1]))):
        spec = known_spec(kind)
        main_name = (spec.row_label or spec.label) if spec else method_label(kind)
        name = f"{method_label(kind)}: {items[0].label or variant}" if variant else main_name
        _draw_group(axes, items, scalars, offsets, colors[variant], line_style(kind), name)
    starts = {offsets[r.path] for r in runs if r.path in offsets}
    for ax in axes:
        for step in starts:  # where the warm start ended
            ax.axvline(step, color="0.5", ls=":", lw=0.8)
    title = f"{DATASET_NAMES.get(d, d)}, {BACKBONE_NAMES.get(b, b)}: ablations (dotted: end of the warm start)"
    return _finish(fig, axes, title, out / f"curves-{d}-{b}-ablations.png")
