"""Figures of `clipit report` (matplotlib, Agg): Pareto, Ω bars, training curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from clipit import layout
from clipit.io import atomic_path
from clipit.methods import known_spec, role_method
from clipit.results.runs import (
    BACKBONE_NAMES,
    DATASET_NAMES,
    MAIN_VARIANTS,
    Run,
    has_images,
    kind_order,
    main_runs,
    method_label,
    order,
    vision_kinds,
)

plt.rcParams.update(
    {
        "font.size": 10,
        "axes.titlesize": 11,
        "axes.labelsize": 10,
        "legend.fontsize": 9,
        "figure.dpi": 110,
        "savefig.dpi": 150,
        "axes.grid": True,
        "grid.alpha": 0.3,
    }
)
GREY = (0.35, 0.35, 0.35, 1.0)  # points and curves of a model without a backbone (one for all backbones)
NO_BACKBONE = "no backbone"  # the training curves' group of such a model


def marker(kind: str) -> str:
    """A kind's marker (its spec's): filled for Table 1's kinds, hollow for the others (the report or a
    CLIP's towers run at test time too)."""
    spec = known_spec(kind)
    return spec.marker if spec else "s"


def line_style(kind: str):
    spec = known_spec(kind)
    return spec.line if spec else "-"


def _colors(backbones: list[str]) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab10")
    return {b: cmap(i % 10) for i, b in enumerate(backbones)}


def _save(fig, path: Path) -> Path:
    """Atomic like every output: a full disk leaves the old figure (or none), never half a PNG."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def _count(x, _pos=None) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if x >= scale:
            return f"{x / scale:g}{unit}"
    return f"{x:g}"


def pareto(runs: list[Run], metric: str, path: Path) -> list[Path]:
    """Accuracy vs parameter count per dataset; arrows unimodal -> CLIP-IT; dashed Pareto frontier."""
    main_kinds, probe, proposed = vision_kinds(), role_method("probe"), role_method("proposed")
    vision = [r for r in runs if r.kind in main_kinds and r.variant in MAIN_VARIANTS and r.params]
    multimodal = [r for r in runs if r.kind not in main_kinds and r.variant in MAIN_VARIANTS and r.params]
    if not vision and not multimodal:
        return []
    datasets = order({r.dataset for r in vision + multimodal}, DATASET_NAMES)
    backbones = order({r.backbone for r in vision + multimodal if has_images(r.kind)}, BACKBONE_NAMES)
    colors = _colors(backbones)
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.6 * len(datasets), 4.2), squeeze=False)
    for ax, d in zip(axes[0], datasets):
        points = []
        for i, b in enumerate(backbones):
            xy = {}
            jitter = 1 + 0.06 * (i - (len(backbones) - 1) / 2)  # equal-size backbones would hide each other
            for kind in main_kinds:
                group = main_runs(runs, b, d, kind)
                group = [r for r in group if r.params]
                if not group:
                    continue
                x = float(np.mean([r.params for r in group])) * jitter
                values = 100 * np.array([r.value(metric) for r in group])
                y, err = float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0
                ax.errorbar(
                    x,
                    y,
                    yerr=err,
                    fmt=marker(kind),
                    color=colors[b],
                    markersize=7,
                    capsize=3,
                    markeredgecolor="black",
                    markeredgewidth=0.5,
                    zorder=3,
                )
                xy[kind] = (x, y)
                points.append((x, y))
            if probe in xy and proposed in xy:
                ax.annotate(
                    "",
                    xy=xy[proposed],
                    xytext=xy[probe],
                    arrowprops=dict(arrowstyle="->", color=colors[b], lw=1.2, alpha=0.8),
                    zorder=2,
                )
        kinds = kind_order({r.kind for r in multimodal if r.dataset == d})
        for kind in kinds:
            for b in order({r.backbone for r in multimodal if r.dataset == d and r.kind == kind}, BACKBONE_NAMES):
                group = [r for r in multimodal if r.dataset == d and r.kind == kind and (r.backbone == b)]
                x = float(np.mean([r.params for r in group]))
                values = 100 * np.array([r.value(metric) for r in group])
                y, err = float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0
                color = colors.get(b, GREY) if has_images(kind) else GREY
                ax.errorbar(
                    x,
                    y,
                    yerr=err,
                    fmt=marker(kind),
                    color=color,
                    markersize=7,
                    capsize=3,
                    markerfacecolor="none",
                    markeredgewidth=1.3,
                    zorder=3,
                )
                points.append((x, y))
        if points:
            frontier, best = [], -np.inf
            for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
                if y > best:
                    frontier.append((x, y))
                    best = y
            fx, fy = zip(*frontier)
            ax.step(fx, fy, where="post", color="0.4", ls="--", lw=1, zorder=1)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(_count))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(DATASET_NAMES.get(d, d))
        ax.set_xlabel("parameters at inference (log scale; equal sizes offset slightly)")
        ax.set_ylabel(f"test {metric.replace('_', ' ')} (%)")
        ax.margins(x=0.15, y=0.12)
    handles = [
        Line2D([], [], color=colors[b], marker="s", ls="", markersize=8, label=BACKBONE_NAMES.get(b, b))
        for b in backbones
    ]
    handles += [
        Line2D([], [], color="0.3", marker=marker(k), ls="", markersize=7, label=method_label(k)) for k in main_kinds
    ]
    handles += [
        Line2D(
            [],
            [],
            color="0.3",
            marker=marker(k),
            ls="",
            markersize=7,
            markerfacecolor="none",
            label=f"{method_label(k)} (multimodal)",
        )
        for k in kind_order({r.kind for r in multimodal})
    ]
    handles += [Line2D([], [], color="0.4", ls="--", label="Pareto frontier")]
    fig.legend(
        handles=handles,
        loc="lower center",
        ncol=min(len(handles), 6),
        bbox_to_anchor=(0.5, -0.02 - 0.05 * (len(handles) > 6)),
        frameon=False,
    )
    fig.suptitle("Accuracy vs model size: unimodal → CLIP-IT (arrows); hollow: multimodal at test time")
    fig.tight_layout(rect=(0, 0.1 if len(handles) > 6 else 0.07, 1, 0.97))
    return [_save(fig, path)]


def omega_bars(records: list[dict], path: Path) -> list[Path]:
    """Ω × 100 per dataset, one bar per backbone (error bars: std over seeds)."""
    datasets = order({r["dataset"] for r in records}, DATASET_NAMES)
    backbones = order({r["backbone"] for r in records}, BACKBONE_NAMES)
    colors = _colors(backbones)
    width = 0.8 / max(1, len(backbones))
    fig, ax = plt.subplots(figsize=(max(4.5, 1.2 + 1.1 * len(datasets) * max(1, len(backbones)) * 0.45), 3.8))
    top = 0.0
    for i, b in enumerate(backbones):
        xs, ys, es = [], [], []
        for j, d in enumerate(datasets):
            rec = next((r for r in records if r["backbone"] == b and r["dataset"] == d), None)
            if rec is None:
                continue
            xs.append(j - 0.4 + width * (i + 0.5))
            ys.append(100 * rec["omega_mean"])
            es.append(100 * rec["omega_std"])
        bars = ax.bar(
            xs,
            ys,
            width * 0.92,
            yerr=es,
            capsize=2,
            color=colors[b],
            edgecolor="black",
            linewidth=0.4,
            label=BACKBONE_NAMES.get(b, b),
        )
        for bar, y, e in zip(bars, ys, es):
            ax.text(bar.get_x() + bar.get_width() / 2, y + e + 0.15, f"{y:.1f}", ha="center", va="bottom", fontsize=8)
            top = max(top, y + e)
    ax.set_xticks(range(len(datasets)), [DATASET_NAMES.get(d, d) for d in datasets])
    ax.set_ylabel("Ω × 100 (% of test samples)")
    ax.set_ylim(0, top * 1.18 + 0.5)
    ax.set_title("Ω: text-only model right, unimodal vision model wrong")
    ax.grid(axis="x", visible=False)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    return [_save(fig, path)]


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


def training_curves(runs: list[Run], out: Path) -> list[Path]:
    """Per dataset: train loss and validation balanced accuracy vs step (mean over seeds per group)."""
    tags = ("train/loss", "val/balanced_accuracy")
    main = [r for r in runs if r.variant in MAIN_VARIANTS and layout.tensorboard_dir(r.path).is_dir()]
    paths = []
    for d in order({r.dataset for r in main}, DATASET_NAMES):
        groups: dict[tuple, list] = {}
        for r in main:
            if r.dataset != d:
                continue
            try:
                scalars = read_scalars(layout.tensorboard_dir(r.path), tags)
            except Exception:
                continue
            key = (r.backbone if has_images(r.kind) else NO_BACKBONE, r.kind)
            groups.setdefault(key, []).append(scalars)
        if not groups:
            continue
        backbones = order({k[0] for k in groups}, BACKBONE_NAMES | {NO_BACKBONE: NO_BACKBONE})
        colors = _colors([b for b in backbones if b != NO_BACKBONE]) | {NO_BACKBONE: GREY}
        fig, axes = plt.subplots(1, 2, figsize=(10.5, 3.9))
        for (b, kind), items in sorted(groups.items(), key=lambda kv: (backbones.index(kv[0][0]), kv[0][1])):
            for ax, tag, scale in ((axes[0], tags[0], 1.0), (axes[1], tags[1], 100.0)):
                curves = [s[tag] for s in items if tag in s]
                if not curves:
                    continue
                steps, values, spread = _mean_curve(curves)
                if len(curves) > 1:  # the seed band: mean ± std
                    ax.fill_between(
                        steps, scale * (values - spread), scale * (values + spread), color=colors[b], alpha=0.15, lw=0
                    )
                ax.plot(
                    steps,
                    scale * values,
                    color=colors[b],
                    ls=line_style(kind),
                    lw=1.6,
                    marker="." if len(steps) < 30 else None,
                    label=f"{BACKBONE_NAMES.get(b, b)} {method_label(kind)}"
                    if b != NO_BACKBONE
                    else method_label(kind),
                )
        axes[0].set_title("training loss")
        axes[0].set_ylabel("loss (CE + λ·KD for CLIP-IT)")
        axes[1].set_title("validation balanced accuracy")
        axes[1].set_ylabel("%")
        for ax in axes:
            ax.set_xlabel("optimizer step")
        handles, labels = axes[1].get_legend_handles_labels() or axes[0].get_legend_handles_labels()
        if not handles:
            handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
        n_seeds = max(len(v) for v in groups.values())
        fig.suptitle(f"{DATASET_NAMES.get(d, d)}: training curves (mean over up to {n_seeds} seeds, band ± std)")
        fig.tight_layout()
        paths.append(_save(fig, out / f"curves-{d}.png"))
    return paths
