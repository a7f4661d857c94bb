"""The tables of the runs that vary a Table 1 cell: every ablation variant (and extra method) beside the
main runs, and the LoRA search's setting chosen on validation."""

from __future__ import annotations

import numpy as np

from clipit.methods import known_spec, role_method
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
from clipit.results.stats import seed_stats
from clipit.results.tables import fmt_delta, fmt_stat


def ablation_table(runs: list[Run], metric: str) -> tuple[list[str], list[list[str]], list[dict]]:
    """Every variant (and extra method) of each backbone x dataset that has more than Table 1's two."""
    header = [
        "Backbone",
        "Dataset",
        "Configuration",
        "Method",
        "Seeds",
        "Balanced accuracy" if metric == "balanced_accuracy" else metric,
        "Δ vs unimodal",
        "Δ vs the run it varies",
    ]
    rows, records = [], []
    probe, proposed = role_method("probe"), role_method("proposed")
    groups: dict[tuple, dict[tuple, list[Run]]] = {}
    for r in runs:
        groups.setdefault((r.backbone, r.dataset), {}).setdefault((r.variant, r.method, r.kind), []).append(r)
    for b, d in sorted(groups, key=lambda k: (order([k[0]], BACKBONE_NAMES), order([k[1]], DATASET_NAMES), k)):
        entries = groups[(b, d)]
        extra = [
            k for k in entries if k[0] not in MAIN_VARIANTS and not any("lora" in (r.axes or {}) for r in entries[k])
        ]  # the LoRA search has a section of its own
        if not extra:  # Table 1's runs (and the text-only model, reported with Omega) only
            continue
        uni = main_runs(runs, b, d, probe)
        cli = main_runs(runs, b, d, proposed)
        su = seed_stats(uni, metric) if uni else None
        sc = seed_stats(cli, metric) if cli else None
        main = [k for k in entries if k[0] in MAIN_VARIANTS and k[2] in vision_kinds()]
        for key in sorted(main, key=lambda k: k[2] != probe) + sorted(extra):
            variant, method, kind = key
            s = seed_stats(entries[key], metric)
            first = entries[key][0]
            spec = known_spec(kind)
            label = (
                (first.label or variant)
                if variant not in MAIN_VARIANTS
                else (spec.row_label or spec.label)
                if spec
                else method_label(kind)
            )
            # Δ against the run this one varies: its grid `compare_to` row, else the main run of its kind
            # (CLIP-IT for the CLIP-IT variants); the main runs themselves have none
            base = None
            if variant not in MAIN_VARIANTS:
                ref = [
                    r
                    for r in runs
                    if r.backbone == b
                    and r.dataset == d
                    and r.variant == first.compare_to
                    and (r.kind == kind or first.compare_to == "" and r.kind == proposed)
                ]
                ref = [r for r in ref if r.method == method] or ref
                base = seed_stats(ref, metric) if ref else sc
            rows.append(
                [
                    BACKBONE_NAMES.get(b, b),
                    DATASET_NAMES.get(d, d),
                    label,
                    method,
                    str(s[2]),
                    fmt_stat(s),
                    fmt_delta(su, s),
                    fmt_delta(base, s),
                ]
            )
            records.append(
                {
                    "backbone": b,
                    "dataset": d,
                    "variant": variant,
                    "label": label,
                    "method": method,
                    "kind": kind,
                    "mean": s[0],
                    "std": s[1],
                    "n": s[2],
                    "compared_to": (first.compare_to or "full") if variant not in MAIN_VARIANTS else "",
                    "delta_unimodal": (s[0] - su[0]) if su else None,
                    "delta_clipit": (s[0] - base[0]) if base else None,
                }
            )
    return header, rows, records


def lora_table(runs: list[Run], metric: str) -> tuple[list[str], list[list[str]], list[dict]]:
    """The LoRA search (grid axis `lora`): per backbone x dataset the setting whose selected checkpoints
    have the best mean validation balanced accuracy, with its test numbers."""
    header = [
        "Backbone",
        "Dataset",
        "Chosen LoRA setting",
        "Settings searched",
        "Val balanced accuracy",
        f"Test {'balanced accuracy' if metric == 'balanced_accuracy' else metric}",
        "Table 1 setting (test)",
    ]
    rows, records = [], []
    proposed = role_method("proposed")
    searched = {(r.backbone, r.dataset) for r in runs if "lora" in (r.axes or {})}
    for b, d in sorted(searched, key=lambda k: (order([k[0]], BACKBONE_NAMES), order([k[1]], DATASET_NAMES))):
        cands: dict[str, list[Run]] = {}
        for r in runs:
            if (
                r.backbone == b
                and r.dataset == d
                and r.kind == proposed
                and ("lora" in (r.axes or {}) or r.variant in MAIN_VARIANTS)
            ):
                cands.setdefault(r.variant, []).append(r)
        scored = {v: [r.best_val["balanced_accuracy"] for r in rs if r.best_val] for v, rs in cands.items()}
        scored = {v: float(np.mean(x)) for v, x in scored.items() if x}
        if not scored:
            continue
        chosen = max(scored, key=lambda v: (scored[v], v in MAIN_VARIANTS))
        s = seed_stats(cands[chosen], metric)
        main = cands.get("") or next((cands[v] for v in MAIN_VARIANTS if v in cands), None)
        sm = seed_stats(main, metric) if main else None
        label = "Table 1 setting" if chosen in MAIN_VARIANTS else (cands[chosen][0].label or chosen)
        rows.append(
            [
                BACKBONE_NAMES.get(b, b),
                DATASET_NAMES.get(d, d),
                label,
                str(len(scored)),
                f"{100 * scored[chosen]:.2f}",
                fmt_stat(s),
                fmt_stat(sm),
            ]
        )
        records.append(
            {
                "backbone": b,
                "dataset": d,
                "chosen": chosen or "full",
                "label": label,
                "settings": len(scored),
                "val_mean": scored[chosen],
                "mean": s[0],
                "std": s[1],
                "n": s[2],
                "table1_mean": sm and sm[0],
            }
        )
    return header, rows, records
