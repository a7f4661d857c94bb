"""Two tables about whether a number is real: the paired gain of CLIP-IT over its warm start (with a
bootstrap interval over seeds), and our cells beside the published ones (clipit/results/references.py)."""

from __future__ import annotations

import numpy as np

from clipit.methods import role_method
from clipit.results.references import Reference, sources
from clipit.results.runs import (
    BACKBONE_NAMES,
    DATASET_NAMES,
    MAIN_VARIANTS,
    Run,
    kind_order,
    main_runs,
    method_label,
    order,
    variant_label,
)
from clipit.results.stats import CONFIDENCE, bootstrap_interval, paired_gain, seed_stats, stats, verdict


def _points(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "–"
    return f"{100 * x:+.2f}" if signed else f"{100 * x:.2f}"


def _interval(ci: tuple[float, float] | None) -> str:
    return "–" if ci is None else f"[{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}]"


def _mean_std(s: tuple[float, float | None, int]) -> str:
    mean, std, n = s
    return f"{100 * mean:+.2f} (1 seed)" if std is None else f"{100 * mean:+.2f} ± {100 * std:.2f}"


def reference_gains(refs: list[Reference]) -> dict[str, dict[tuple[str, str], float]]:
    """Per source with both numbers for a (dataset, backbone) main cell: its proposed minus its probe."""
    probe, proposed = role_method("probe"), role_method("proposed")
    values = {(r.source, r.dataset, r.backbone, r.method): r.value for r in refs if r.variant in MAIN_VARIANTS}
    gains: dict[str, dict[tuple[str, str], float]] = {}
    for (source, d, b, method), value in values.items():
        if method == proposed and (source, d, b, probe) in values:
            gains.setdefault(source, {})[(d, b)] = value - values[(source, d, b, probe)]
    return gains


def gains_table(
    runs: list[Run], metric: str, refs: list[Reference] = ()
) -> tuple[list[str], list[list[str]], list[dict]]:
    """Per backbone x dataset: the proposed run minus the probe it warm-starts from, seed by seed (only
    seeds with both), mean ± std and a bootstrap interval of the mean; then per dataset the mean over the
    cells that have such a pair (the interval resamples seeds within each cell). Each reference source
    with both numbers for a cell gets a column of its gain; in the mean row, its mean over the same
    backbones (over those it has, named, when it lacks some)."""
    probe, proposed = role_method("probe"), role_method("proposed")
    vision = [r for r in runs if r.kind in (probe, proposed) and r.variant in MAIN_VARIANTS]
    published = reference_gains(refs if metric == "balanced_accuracy" else [])
    pct = int(100 * CONFIDENCE)
    header = ["Dataset", "Vision backbone", "Paired seeds", "Gain (points)", f"{pct}% bootstrap interval", "Verdict"]
    header += [f"{source} gain" for source in published]
    rows, records = [], []
    for d in order({r.dataset for r in vision}, DATASET_NAMES):
        gains, paired = [], []
        for b in order({r.backbone for r in vision if r.dataset == d}, BACKBONE_NAMES):
            g = paired_gain(runs, b, d, metric)
            if g is None:
                continue
            gains.append(g)
            paired.append(b)
            s, ci = stats(g.gains), g.interval
            theirs = {source: cells.get((d, b)) for source, cells in published.items()}
            rows.append(
                [
                    DATASET_NAMES.get(d, d),
                    BACKBONE_NAMES.get(b, b),
                    str(len(g.seeds)),
                    _mean_std(s),
                    _interval(ci),
                    verdict(ci),
                    *(_points(v, signed=True) for v in theirs.values()),
                ]
            )
            records.append(
                {
                    "dataset": d,
                    "backbone": b,
                    "seeds": " ".join(map(str, g.seeds)),
                    "n": len(g.seeds),
                    "gain_mean": s[0],
                    "gain_std": s[1],
                    "gain_ci_low": ci and ci[0],
                    "gain_ci_high": ci and ci[1],
                    "verdict": verdict(ci),
                }
                | {f"{source}_gain_mean": v for source, v in theirs.items()}
            )
        if gains:
            theirs = {source: _mean_over(cells, d, paired) for source, cells in published.items()}
            mean = float(np.mean([g.mean for g in gains]))
            ci = bootstrap_interval([g.gains for g in gains])
            rows.append(
                [
                    DATASET_NAMES.get(d, d),
                    f"Mean over {len(gains)} backbone(s) with both",
                    "",
                    _points(mean, signed=True),
                    _interval(ci),
                    verdict(ci),
                    *(text for _, text in theirs.values()),
                ]
            )
            records.append(
                {
                    "dataset": d,
                    "backbone": "mean gain",
                    "seeds": "",
                    "n": len(gains),
                    "gain_mean": mean,
                    "gain_std": None,
                    "gain_ci_low": ci and ci[0],
                    "gain_ci_high": ci and ci[1],
                    "verdict": verdict(ci),
                }
                | {f"{source}_gain_mean": value for source, (value, _) in theirs.items()}
            )
    return header, rows, records


def _mean_over(cells: dict[tuple[str, str], float], dataset: str, backbones: list[str]) -> tuple[float | None, str]:
    """A source's mean gain over the backbones our mean row averages, and its cell text (the backbones it
    lacks named: that mean is over fewer)."""
    have = [b for b in backbones if (dataset, b) in cells]
    if not have:
        return None, "–"
    mean = float(np.mean([cells[(dataset, b)] for b in have]))
    lacks = [BACKBONE_NAMES.get(b, b) for b in backbones if b not in have]
    return mean, _points(mean, signed=True) + (f" (without {', '.join(lacks)})" if lacks else "")


def cell_runs(runs: list[Run], ref: Reference) -> list[Run]:
    """Our runs of a reference cell: the main runs of its method, or the runs of its grid variant."""
    if ref.variant in MAIN_VARIANTS:
        return main_runs(runs, ref.backbone, ref.dataset, ref.method)
    return [
        r
        for r in runs
        if r.backbone == ref.backbone and r.dataset == ref.dataset and r.variant == ref.variant and r.kind == ref.method
    ]


def comparison_table(
    runs: list[Run], refs: list[Reference], metric: str, tolerance: float
) -> tuple[list[str], list[list[str]], list[dict]]:
    """Every reference cell we have runs for: ours (mean ± std over seeds), each source's number and our
    difference to it, and the sources further than `tolerance` points from ours."""
    if metric != "balanced_accuracy":  # every shipped reference is balanced accuracy
        refs = []
    names = sources(refs)
    cells: dict[tuple, dict[str, Reference]] = {}
    for ref in refs:
        cells.setdefault(ref.cell, {})[ref.source] = ref
    header = ["Dataset", "Vision backbone", "Method", "Ours"]
    for name in names:
        header += [name, f"Δ {name}"]
    header.append(f"Outside ±{tolerance:g}")
    rows, records = [], []
    datasets = order({c[0] for c in cells}, DATASET_NAMES)
    backbones = order({c[1] for c in cells}, BACKBONE_NAMES)
    kinds = kind_order({c[2] for c in cells})
    for cell in sorted(
        cells, key=lambda c: (datasets.index(c[0]), backbones.index(c[1]), c[3] != "", c[3], kinds.index(c[2]))
    ):
        by_source = cells[cell]
        ours = cell_runs(runs, next(iter(by_source.values())))
        if not ours:
            continue
        mean, std, n = seed_stats(ours, metric)
        d, b, method, variant = cell
        label = method_label(method) + (f", {ours[0].label or variant_label(variant)}" if variant else "")
        row = [DATASET_NAMES.get(d, d), BACKBONE_NAMES.get(b, b), label]
        row.append(f"{100 * mean:.2f} (1 seed)" if std is None else f"{100 * mean:.2f} ± {100 * std:.2f}")
        record = {"dataset": d, "backbone": b, "method": method, "variant": variant, "mean": mean, "std": std, "n": n}
        outside = []
        for name in names:
            ref = by_source.get(name)
            delta = None if ref is None else mean - ref.value
            if delta is not None and abs(100 * delta) > tolerance + 1e-9:
                outside.append(name)
            row += [_points(ref and ref.value), _points(delta, signed=True)]
            record |= {
                f"{name}_mean": ref and ref.value,
                f"delta_{name}": delta,
                f"{name}_version": ref and ref.version,
            }
        row.append(", ".join(outside) or "–")
        records.append(record | {"outside_tolerance": " ".join(outside), "tolerance_points": tolerance})
        rows.append(row)
    return header, rows, records


def source_lines(refs: list[Reference]) -> list[str]:
    """One Markdown line per source and version: where each reference column comes from."""
    seen = dict.fromkeys((r.source, r.version) for r in refs)
    return [f"- `{s}`: {v}" for s, v in seen]
