"""The paper's tables from finished runs: Table 1, ablations, Omega, the text-only row, run records."""

from __future__ import annotations

import csv
import io
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from clipit import layout
from clipit.io import atomic_write_text
from clipit.methods import known_spec, role_method
from clipit.results.runs import (
    BACKBONE_NAMES,
    DATASET_NAMES,
    MAIN_VARIANTS,
    Run,
    Unreadable,
    has_images,
    kind_order,
    main_runs,
    method_label,
    order,
    vision_kinds,
    warn_to_log,
)
from clipit.results.stats import seed_stats as _seed_stats
from clipit.results.stats import stats as _stats


def _fmt(stat: tuple[float, float, int] | None, scale: float = 100.0, digits: int = 2) -> str:
    if stat is None:
        return "–"
    mean, std, n = stat
    if n == 1:  # no spread from a single seed
        return f"{scale * mean:.{digits}f} (1 seed)"
    return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"


def _delta(a, b, scale=100.0) -> str:
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
            row += [_fmt(extra[k]) for k in others] + [_fmt(su), _fmt(sc), _delta(su, sc)]
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
                f"{100 * float(np.mean(deltas)):+.2f} ({len(deltas)} backbones)" if deltas else "–",
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
        su = _seed_stats(uni, metric) if uni else None
        sc = _seed_stats(cli, metric) if cli else None
        main = [k for k in entries if k[0] in MAIN_VARIANTS and k[2] in vision_kinds()]
        for key in sorted(main, key=lambda k: k[2] != probe) + sorted(extra):
            variant, method, kind = key
            s = _seed_stats(entries[key], metric)
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
                base = _seed_stats(ref, metric) if ref else sc
            rows.append(
                [
                    BACKBONE_NAMES.get(b, b),
                    DATASET_NAMES.get(d, d),
                    label,
                    method,
                    str(s[2]),
                    _fmt(s),
                    _delta(su, s),
                    _delta(base, s),
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


def multimodal_table(runs: list[Run], metric: str) -> tuple[list[str], list[list[str]], list[dict]]:
    """The main runs of every method beyond Table 1's vision models (text-only, late fusion, CLIP-based
    baselines) with the parameters that run at test time."""
    header = [
        "Dataset",
        "Model",
        "Method",
        "Seeds",
        "Balanced accuracy" if metric == "balanced_accuracy" else metric,
        "Parameters at inference",
    ]
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        if r.kind not in vision_kinds() and r.variant in MAIN_VARIANTS:
            groups.setdefault((r.dataset, r.backbone if has_images(r.kind) else "–", r.kind), []).append(r)
    rows, records = [], []
    kinds = kind_order({k[2] for k in groups})
    for key in sorted(
        groups, key=lambda k: (order([k[0]], DATASET_NAMES), kinds.index(k[2]), order([k[1]], BACKBONE_NAMES), k)
    ):
        d, b, kind = key
        group = groups[key]
        s = _seed_stats(group, metric)
        params = [r.params for r in group if r.params]
        p = int(np.mean(params)) if params else None
        rows.append(
            [
                DATASET_NAMES.get(d, d),
                BACKBONE_NAMES.get(b, b),
                method_label(kind),
                str(s[2]),
                _fmt(s),
                f"{p / 1e6:.1f}M" if p else "–",
            ]
        )
        records.append(
            {"dataset": d, "model": b, "kind": kind, "mean": s[0], "std": s[1], "n": s[2], "params_inference": p}
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
        s = _seed_stats(cands[chosen], metric)
        main = cands.get("") or next((cands[v] for v in MAIN_VARIANTS if v in cands), None)
        sm = _seed_stats(main, metric) if main else None
        label = "Table 1 setting" if chosen in MAIN_VARIANTS else (cands[chosen][0].label or chosen)
        rows.append(
            [
                BACKBONE_NAMES.get(b, b),
                DATASET_NAMES.get(d, d),
                label,
                str(len(scored)),
                f"{100 * scored[chosen]:.2f}",
                _fmt(s),
                _fmt(sm),
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


def load_predictions(run: Run, split: str = "test") -> dict | None:
    """keys, labels and predicted classes of a run; None without the file; Unreadable when it is broken."""
    path = layout.predictions_file(run.path, split)
    if not path.exists():
        return None
    try:
        with np.load(path) as data:
            out = {
                "keys": np.asarray(data["keys"]).astype(str),
                "labels": np.asarray(data["labels"]),
                "pred": np.asarray(data["logits"]).argmax(axis=1),
            }
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as err:
        raise Unreadable(
            path, f"unreadable predictions ({type(err).__name__}: {' '.join(str(err).split())[:200]})"
        ) from None
    if not len(out["keys"]) == len(out["labels"]) == len(out["pred"]):
        raise Unreadable(path, "keys, labels and logits differ in length")
    return out


def omega(text_pred: dict, vision_pred: dict) -> tuple[float, int]:
    """(Ω, number of matched test samples): text right and vision wrong, matched by key."""
    common, ti, vi = np.intersect1d(text_pred["keys"], vision_pred["keys"], assume_unique=False, return_indices=True)
    if len(common) == 0:
        raise ValueError("text and vision predictions share no sample keys")
    if not np.array_equal(text_pred["labels"][ti], vision_pred["labels"][vi]):
        raise ValueError("text and vision predictions disagree on the labels of the same keys")
    labels = vision_pred["labels"][vi]
    text_ok = text_pred["pred"][ti] == labels
    vision_wrong = vision_pred["pred"][vi] != labels
    return float(np.mean(text_ok & vision_wrong)), int(len(common))


def omega_table(
    runs: list[Run], warn: Callable[[str], None] = warn_to_log
) -> tuple[list[str], list[list[str]], list[dict]]:
    """Ω per backbone x dataset over the seeds whose text and vision predictions both load; a seed left
    out (broken predictions file, no shared keys) is named through `warn`."""
    text, probe = role_method("text"), role_method("probe")
    text_runs: dict[tuple, list[Run]] = {}
    for r in runs:
        if r.kind == text and r.variant in MAIN_VARIANTS:
            text_runs.setdefault(r.dataset, []).append(r)
    header = ["Backbone", "Dataset", "Ω × 100 (mean ± std)", "Seeds", "Matched test samples"]
    rows, records = [], []
    vision = [r for r in runs if r.kind == probe and r.variant in MAIN_VARIANTS]
    for b in order({r.backbone for r in vision}, BACKBONE_NAMES):
        for d in order({r.dataset for r in vision if r.backbone == b}, DATASET_NAMES):
            texts = text_runs.get(d, [])
            if not texts:
                continue
            values, matched, seeds = [], [], []
            for v in sorted(main_runs(runs, b, d, probe), key=lambda r: r.seed):
                same = [t for t in texts if t.seed == v.seed and t.backbone == b] or [
                    t for t in texts if t.seed == v.seed
                ]
                if not same:
                    continue
                try:
                    tp, vp = load_predictions(same[0]), load_predictions(v)
                    if tp is None or vp is None:
                        continue
                    value, n = omega(tp, vp)
                except (Unreadable, ValueError) as err:
                    warn(
                        f"Ω of {b} on {d}, seed {v.seed} left out: {err} (text run {same[0].path}, vision run {v.path})"
                    )
                    continue
                values.append(value)
                matched.append(n)
                seeds.append(v.seed)
            if not values:
                continue
            s = _stats(values)
            rows.append(
                [
                    BACKBONE_NAMES.get(b, b),
                    DATASET_NAMES.get(d, d),
                    _fmt(s),
                    str(len(values)),
                    str(min(matched)) if len(set(matched)) == 1 else f"{min(matched)}–{max(matched)}",
                ]
            )
            records.append(
                {
                    "backbone": b,
                    "dataset": d,
                    "omega_mean": s[0],
                    "omega_std": s[1],
                    "n_seeds": s[2],
                    "seeds": " ".join(map(str, seeds)),
                    "matched": min(matched),
                }
            )
    return header, rows, records


def text_table(runs: list[Run], metric: str) -> list[list[str]]:
    rows = []
    text = role_method("text")
    texts = [r for r in runs if r.kind == text and r.variant in MAIN_VARIANTS]
    for d in order({r.dataset for r in texts}, DATASET_NAMES):
        s = _seed_stats([r for r in texts if r.dataset == d], metric)
        rows.append([DATASET_NAMES.get(d, d), str(s[2]), _fmt(s)])
    return rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# record keys that hold a fraction of samples: the CSVs give them in percent, named with the unit
PERCENT_KEYS = (
    "mean",
    "std",
    "delta",
    "val_mean",
    "table1_mean",
    "balanced_accuracy",
    "accuracy",
    "omega_std",
    "gain_ci_low",
    "gain_ci_high",
)


def _is_percent(key: str) -> bool:
    return key in PERCENT_KEYS or key.endswith(("_mean", "_std")) or key.startswith("delta")


def write_csv(path: Path, records: list[dict], fields: list[str] | None = None) -> None:
    """Records as CSV: fractions in percent (column suffix `_pct`), empty cells for missing values; no
    records gives a file with the header only (`fields`)."""
    names = list(dict.fromkeys(k for r in records for k in r)) if records else list(fields or [])
    if not names:
        raise ValueError(f"{path}: no records and no column names")
    column = {k: f"{k}_pct" if _is_percent(k) and not k.endswith("_n") else k for k in names}
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=[column[k] for k in names])
    writer.writeheader()
    for r in records:
        writer.writerow(
            {
                column[k]: (
                    ""
                    if v is None
                    else 100 * v
                    if _is_percent(k) and isinstance(v, (int, float)) and not isinstance(v, bool)
                    else v
                )
                for k, v in r.items()
            }
        )
    atomic_write_text(path, buf.getvalue())


def run_records(runs: list[Run]) -> list[dict]:
    return [
        {
            "backbone": r.backbone,
            "dataset": r.dataset,
            "variant": r.variant,
            "method": r.method,
            "kind": r.kind,
            "seed": r.seed,
            "balanced_accuracy": r.metrics.get("balanced_accuracy"),
            "accuracy": r.metrics.get("accuracy"),
            "params_total": r.params,
            "params_trainable": (r.metrics.get("parameters") or {}).get("trainable"),
            "run_dir": str(r.path),
        }
        for r in sorted(runs, key=lambda r: (r.dataset, r.backbone, r.variant, r.method, r.seed))
    ]


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
