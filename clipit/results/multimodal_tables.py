"""The tables of the models beyond Table 1's vision models: every other method's main runs with its
parameters at inference, the text-only row, and Ω (text-only right where the vision model is wrong)."""

from __future__ import annotations

import zipfile
from collections.abc import Callable

import numpy as np

from clipit import layout
from clipit.methods import role_method
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
from clipit.results.stats import seed_stats, stats
from clipit.results.tables import fmt_stat


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
        s = seed_stats(group, metric)
        params = [r.params for r in group if r.params]
        p = int(np.mean(params)) if params else None
        rows.append(
            [
                DATASET_NAMES.get(d, d),
                BACKBONE_NAMES.get(b, b),
                method_label(kind),
                str(s[2]),
                fmt_stat(s),
                f"{p / 1e6:.1f}M" if p else "–",
            ]
        )
        records.append(
            {"dataset": d, "model": b, "kind": kind, "mean": s[0], "std": s[1], "n": s[2], "params_inference": p}
        )
    return header, rows, records


def text_table(runs: list[Run], metric: str) -> list[list[str]]:
    rows = []
    text = role_method("text")
    texts = [r for r in runs if r.kind == text and r.variant in MAIN_VARIANTS]
    for d in order({r.dataset for r in texts}, DATASET_NAMES):
        s = seed_stats([r for r in texts if r.dataset == d], metric)
        rows.append([DATASET_NAMES.get(d, d), str(s[2]), fmt_stat(s)])
    return rows


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
            s = stats(values)
            rows.append(
                [
                    BACKBONE_NAMES.get(b, b),
                    DATASET_NAMES.get(d, d),
                    fmt_stat(s),
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
