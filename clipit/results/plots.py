"""Figures of `clipit report` (matplotlib, Agg): Pareto and Ω bars (training curves: curves.py). Every
figure is written as PNG (for report.md), PDF and SVG (vector, for a paper; text kept as text)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

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
from clipit.results.stats import seed_stats

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
        "pdf.fonttype": 42,  # TrueType in the PDF (journals reject Type 3), text editable in the SVG
        "ps.fonttype": 42,
        "svg.fonttype": "none",
        "svg.hashsalt": "clipit",  # stable ids: the same figure gives the same SVG
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


def backbone_colors(backbones: list[str]) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab10")
    return {b: cmap(i % 10) for i, b in enumerate(backbones)}


FORMATS = ("png", "pdf", "svg")  # the PNG first: report.md links it


def save(fig, path: Path) -> list[Path]:
    """`path` (its stem) as PNG, PDF and SVG; atomic like every output: a full disk leaves the old figure
    (or none), never half a file."""
    written = []
    try:
        for fmt in FORMATS:
            target = path.with_suffix(f".{fmt}")
            with atomic_path(target) as tmp:
                fig.savefig(tmp, format=fmt, bbox_inches="tight", metadata=_METADATA[fmt])
            written.append(target)
    finally:
        plt.close(fig)
    return written


# no creation date in the vector files: the same runs give the same bytes
_METADATA = {"png": {}, "pdf": {"CreationDate": None}, "svg": {"Date": None}}


def _count(x, _pos=None) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if x >= scale:
            return f"{x / scale:g}{unit}"
    return f"{x:g}"


def _point(group: list[Run], metric: str) -> tuple[float, float, float]:
    """(parameters, mean %, std %) of a group of runs, each seed once (copies of the text-only model too)."""
    mean, std, _ = seed_stats(group, metric)
    return float(np.mean([r.params for r in group])), 100 * mean, 100 * (std or 0.0)


def _frontier(ax, points: list[tuple[float, float]]) -> None:
    """The dashed Pareto frontier: no point has fewer parameters and a higher accuracy."""
    frontier, best = [], -np.inf
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            frontier.append((x, y))
            best = y
    fx, fy = zip(*frontier)
    ax.step(fx, fy, where="post", color="0.4", ls="--", lw=1, zorder=1)


def _pareto_points(runs: list[Run], metric: str, d: str, backbones: list[str]) -> tuple[list, list]:
    """(vision, multimodal) points of one dataset: (backbone, kind, x, y, err); the text-only model and
    other backbone-free models once, under no backbone."""
    main_kinds = vision_kinds()
    vision, multimodal = [], []
    for i, b in enumerate(backbones):
        jitter = 1 + 0.06 * (i - (len(backbones) - 1) / 2)  # equal-size backbones would hide each other
        for kind in main_kinds:
            group = [r for r in main_runs(runs, b, d, kind) if r.params]
            if group:
                x, y, err = _point(group, metric)
                vision.append((b, kind, x * jitter, y, err))
    others = [
        r for r in runs if r.dataset == d and r.kind not in main_kinds and r.variant in MAIN_VARIANTS and r.params
    ]
    for kind in kind_order({r.kind for r in others}):
        mine = [r for r in others if r.kind == kind]
        for b in order({r.backbone for r in mine}, BACKBONE_NAMES) if has_images(kind) else [NO_BACKBONE]:
            group = [r for r in mine if r.backbone == b or b == NO_BACKBONE]
            multimodal.append((b, kind, *_point(group, metric)))
    return vision, multimodal


def _draw(ax, points, colors, hollow: bool) -> None:
    for b, kind, x, y, err in points:
        style = (
            dict(markerfacecolor="none", markeredgewidth=1.3)
            if hollow
            else dict(markeredgecolor="black", markeredgewidth=0.5)
        )
        ax.errorbar(
            x, y, yerr=err, fmt=marker(kind), color=colors.get(b, GREY), markersize=7, capsize=3, zorder=3, **style
        )


def pareto(runs: list[Run], metric: str, path: Path) -> list[Path]:
    """Accuracy vs parameter count per dataset. Top row: the vision models alone (unimodal -> CLIP-IT
    arrows), on an axis fitted to them; bottom row (when there are any): every model, the ones that need
    the report or a CLIP's towers at test time hollow, so that their lower accuracy does not squash the
    comparison above. Dashed: the Pareto frontier of the points in the panel."""
    probe, proposed = role_method("probe"), role_method("proposed")
    usable = [r for r in runs if r.variant in MAIN_VARIANTS and r.params]
    if not usable:
        return []
    datasets = order({r.dataset for r in usable}, DATASET_NAMES)
    backbones = order({r.backbone for r in usable if has_images(r.kind)}, BACKBONE_NAMES)
    colors = backbone_colors(backbones)
    per_dataset = {d: _pareto_points(runs, metric, d, backbones) for d in datasets}
    two_rows = any(m for _, m in per_dataset.values())
    nrows = 2 if two_rows else 1
    fig, axes = plt.subplots(nrows, len(datasets), figsize=(4.6 * len(datasets), 3.6 * nrows + 0.6), squeeze=False)
    for j, d in enumerate(datasets):
        vision, multimodal = per_dataset[d]
        ax = axes[0][j]
        _draw(ax, vision, colors, hollow=False)
        xy = {(b, k): (x, y) for b, k, x, y, _ in vision}
        for b in backbones:
            if (b, probe) in xy and (b, proposed) in xy:
                ax.annotate(
                    "",
                    xy=xy[(b, proposed)],
                    xytext=xy[(b, probe)],
                    arrowprops=dict(arrowstyle="->", color=colors[b], lw=1.2, alpha=0.8),
                    zorder=2,
                )
        if vision:
            _frontier(ax, [(x, y) for _, _, x, y, _ in vision])
        ax.set_title(f"{DATASET_NAMES.get(d, d)}: vision model alone at test time")
        if two_rows:
            low = axes[1][j]
            _draw(low, vision, colors, hollow=False)
            _draw(low, multimodal, colors, hollow=True)
            if vision or multimodal:
                _frontier(low, [(x, y) for _, _, x, y, _ in vision + multimodal])
            low.set_title(f"{DATASET_NAMES.get(d, d)}: with multimodal / CLIP-based (hollow)")
        for a in axes[:, j]:
            a.set_xscale("log")
            a.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            a.xaxis.set_major_formatter(FuncFormatter(_count))
            a.xaxis.set_minor_formatter(NullFormatter())
            a.set_ylabel(f"test {metric.replace('_', ' ')} (%)")
            a.margins(x=0.15, y=0.12)
        axes[-1][j].set_xlabel("parameters at inference (log scale; equal sizes offset slightly)")
    handles = [
        Line2D([], [], color=colors[b], marker="s", ls="", markersize=8, label=BACKBONE_NAMES.get(b, b))
        for b in backbones
    ]
    handles += [
        Line2D([], [], color="0.3", marker=marker(k), ls="", markersize=7, label=method_label(k))
        for k in vision_kinds()
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
        for k in kind_order({k for _, m in per_dataset.values() for _, k, *_ in m})
    ]
    handles += [Line2D([], [], color="0.4", ls="--", label="Pareto frontier")]
    rows_of_legend = -(-len(handles) // 6)
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), bbox_to_anchor=(0.5, 0.0), frameon=False)
    fig.suptitle("Accuracy vs model size: unimodal → CLIP-IT (arrows)")
    fig.tight_layout(rect=(0, 0.045 * rows_of_legend * (2 / nrows) + 0.02, 1, 0.97))
    return save(fig, path)


def omega_bars(records: list[dict], path: Path) -> list[Path]:
    """Ω × 100 per dataset, one bar per backbone (error bars: std over seeds)."""
    datasets = order({r["dataset"] for r in records}, DATASET_NAMES)
    backbones = order({r["backbone"] for r in records}, BACKBONE_NAMES)
    colors = backbone_colors(backbones)
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
            es.append(100 * (rec["omega_std"] or 0.0))  # one seed: no spread to draw
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
    return save(fig, path)
