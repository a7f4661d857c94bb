"""The report's statistics: mean ± std over seeds, and the paired per-seed gain of the proposed method over
its warm start with a bootstrap interval.

A seed counts once: runs of one seed are averaged first (the text-only model is trained once per backbone
of a grid, each copy the same model; pooling the copies would count each seed six times and shrink the
std). One seed has no spread: std None (an empty CSV cell, never 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from clipit.methods import role_method
from clipit.results.runs import Run, main_runs

BOOTSTRAP_SEED = 0  # fixed: the same runs give the same interval in every report
BOOTSTRAP_RESAMPLES = 10_000
CONFIDENCE = 0.95


def stats(values: list[float]) -> tuple[float, float | None, int]:
    """(mean, sample std with ddof 1, n); one value has no spread: std None."""
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else None, len(a)


def per_seed(runs: list[Run], metric: str) -> dict[int, float]:
    """{seed: value}, the runs of one seed averaged (copies of a backbone-free model count once)."""
    by_seed: dict[int, list[float]] = {}
    for r in runs:
        by_seed.setdefault(r.seed, []).append(r.value(metric))
    return {s: float(np.mean(v)) for s, v in sorted(by_seed.items())}


def seed_stats(runs: list[Run], metric: str) -> tuple[float, float | None, int]:
    """`stats` over seeds, each seed once."""
    return stats(list(per_seed(runs, metric).values()))


def bootstrap_interval(
    groups: list[np.ndarray], seed: int = BOOTSTRAP_SEED, resamples: int = BOOTSTRAP_RESAMPLES
) -> tuple[float, float] | None:
    """Percentile bootstrap (CONFIDENCE) of the mean over groups of each group's mean: seeds are resampled
    with replacement within each group (a cell), independently. None when no group has two values (one
    seed per cell has no spread to resample)."""
    groups = [np.asarray(g, dtype=float) for g in groups if len(g)]
    if not groups or all(len(g) < 2 for g in groups):
        return None
    rng = np.random.default_rng(seed)
    total = np.zeros(resamples)
    for g in groups:
        total += g[rng.integers(0, len(g), size=(resamples, len(g)))].mean(axis=1)
    means = total / len(groups)
    tail = 100 * (1 - CONFIDENCE) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


@dataclass
class Gain:
    """The proposed method minus its warm start (the probe of the same backbone, dataset and seed)."""

    backbone: str
    dataset: str
    seeds: list[int]  # seeds with both runs
    gains: np.ndarray  # per seed, fractions

    @property
    def mean(self) -> float:
        return float(self.gains.mean())

    @property
    def std(self) -> float | None:
        return stats(self.gains)[1]

    @property
    def interval(self) -> tuple[float, float] | None:
        return bootstrap_interval([self.gains])


def paired_gain(runs: list[Run], backbone: str, dataset: str, metric: str) -> Gain | None:
    """Table 1's paired gain of one cell; None unless some seed has both the probe and the proposed run."""
    probe = per_seed(main_runs(runs, backbone, dataset, role_method("probe")), metric)
    proposed = per_seed(main_runs(runs, backbone, dataset, role_method("proposed")), metric)
    seeds = sorted(set(probe) & set(proposed))
    if not seeds:
        return None
    return Gain(backbone, dataset, seeds, np.array([proposed[s] - probe[s] for s in seeds]))


def verdict(interval: tuple[float, float] | None) -> str:
    """What the interval says: "gain" or "loss" when it excludes 0, "within seed noise" when it holds 0,
    "–" without one (a single seed)."""
    if interval is None:
        return "–"
    if interval[0] > 0:
        return "gain"
    return "loss" if interval[1] < 0 else "within seed noise"
