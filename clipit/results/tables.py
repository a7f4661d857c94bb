"""The paper's Table 1 from finished runs, and what every table shares: a mean ± std cell, a Δ cell, a
Markdown table, the grid status lines. The other tables: variant_tables (ablations, LoRA search),
multimodal_tables (other methods, the text-only row, Ω); their files: table_files."""

from __future__ import annotations

import numpy as np

from clipit.methods import role_method
from clipit.results.runs import (
    BACKBONE_NAMES,
    DATASET_NAMES,
    MAIN_VARIANTS,
    Run,
    main_runs,
    method_label,
    order,
    vision_kinds,
)
from clipit.results.stats import seed_stats as _seed_stats


def fmt_stat(stat: tuple[float, float, int] | None, scale: float = 100.0, digits: int = 2) -> str:
    """A (mean, std, seeds) cell in percent: `mean ± std`, `mean (1 seed)`, or – without runs."""
    if stat is None:
        return "–"
    mean, std, n = stat
    if n == 1:  # no spread from a single seed
        return f"{scale * mean:.{digits}f} (1 seed)"
    return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"


def fmt_delta(a, b, scale=100.0) -> str:
    """b's mean minus a's in points, signed; – when either is missing."""
    if a is None or b is None:
        return "–"
    return f"{scale * (b[0] - a[0]):+.2f}"


def table1(runs: list[Run], metric: str) -> tuple[list[str], list[list[str]], list[dict]]:
    """The probe vs the proposed method (roles in clipit/methods.py) per backbone and dataset."""
    probe, proposed = role_method("probe"), role_method("proposed")
    vision = [r for r in runs if r.kind in (probe, proposed)]
    # other main-group probes with main runs (eva_probe: the eva-protocol unimodal column) get a column each
    others = [
        k
        for k in vision_kinds()
        if k not in (probe, proposed) and any(r.kind == k and r.variant in MAIN_VARIANTS for r in runs)
    ]
    backbones = order({r.backbone for r in vision}, BACKBONE_NAMES)
    datasets = order({r.dataset for r in vision}, DATASET_NAMES)
    header = ["Vision backbone"]
    for d in datasets:
        name = DATASET_NAMES.get(d, d)
        header += [f"{name} {method_label(k)}" for k in others]
        header += [f"{name} {method_label(probe)}", f"{name} {method_label(proposed)}", f"{name} Δ"]
    rows, records = [], []
    for b in backbones:
        row = [BACKBONE_NAMES.get(b, b)]
        for d in datasets:
            uni = main_runs(runs, b, d, probe)
            cli = main_runs(runs, b, d, proposed)
            su = _seed_stats(uni, metric) if uni else None
            sc = _seed_stats(cli, metric) if cli else None
            extra = {
                k: _seed_stats(main_runs(runs, b, d, k), metric) if main_runs(runs, b, d, k) else None for k in others
            }
            row += [fmt_stat(extra[k]) for k in others] + [fmt_stat(su), fmt_stat(sc), fmt_delta(su, sc)]
            record = {
                "backbone": b,
                "dataset": d,
                f"{probe}_mean": su and su[0],
                f"{probe}_std": su and su[1],
                f"{probe}_n": su and su[2],
                f"{proposed}_mean": sc and sc[0],
                f"{proposed}_std": sc and sc[1],
                f"{proposed}_n": sc and sc[2],
                "delta": (sc[0] - su[0]) if su and sc else None,
            }
            for k, stats in extra.items():
                record |= {
                    f"{k}_mean": stats and stats[0],
                    f"{k}_std": stats and stats[1],
                    f"{k}_n": stats and stats[2],
                }
            records.append(record)
        rows.append(row)
    if len(backbones) > 1 or rows:  # the paper's per-dataset average gain under Table 1
        gain = ["Mean gain over backbones"]
        for d in datasets:
            deltas = [r["delta"] for r in records if r["dataset"] == d and r["delta"] is not None]
            gain += [""] * len(others) + [
                "",
                "",
                f"{100 * float(np.mean(deltas)):+.2f} ({len(deltas)} backbone{'s' * (len(deltas) != 1)})"
                if deltas
                else "–",
            ]
            records.append(
                {
                    "backbone": "mean gain",
                    "dataset": d,
                    "delta": float(np.mean(deltas)) if deltas else None,
                    "n_backbones": len(deltas),
                }
            )
        rows.append(gain)
    return header, rows, records


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def status_lines(states: list[dict]) -> list[str]:
    counts: dict[str, int] = {}
    failed = []
    for s in states:
        counts[s.get("state", "?")] = counts.get(s.get("state", "?"), 0) + 1
        if s.get("state") == "failed":
            error = (s.get("error") or "").strip().splitlines()
            failed.append(f"- failed: `{s['run_dir']}` (job {s.get('job_id')}): {error[-1] if error else '?'}")
    if not counts:
        return []
    return ["cells without results: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())), ""] + failed
