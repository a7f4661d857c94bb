"""The report's frozen-feature table: k-NN and SimpleShot balanced accuracy of each backbone as the unimodal
probe and CLIP-IT leave it (`clipit evaluate --frozen` writes frozen_eval.json into a run folder)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from clipit import layout
from clipit.evaluation.frozen_record import stale_reason
from clipit.io import read_json_object
from clipit.results.runs import (
    BACKBONE_NAMES,
    DATASET_NAMES,
    MAIN_VARIANTS,
    Run,
    Unreadable,
    kind_order,
    method_label,
    order,
)
from clipit.results.stats import stats


class Stale(Exception):
    """A frozen_eval.json made for an earlier training of its run folder."""


def _read(run: Run) -> dict | None:
    data = read_json_object(layout.frozen_eval_file(run.path), error=Unreadable, missing_ok=True)
    if data is None:
        return None
    try:
        knn = float(data["knn"]["balanced_accuracy"])
        shots = {int(n): float(s["mean"]) for n, s in data["simpleshot"]["shots"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise Unreadable(
            layout.frozen_eval_file(run.path), f"unexpected content ({type(err).__name__}: {err})"
        ) from None
    if not all(np.isfinite([knn, *shots.values()])):
        raise Unreadable(layout.frozen_eval_file(run.path), "holds a non-finite number")
    why = stale_reason(run.path, data)
    if why:
        raise Stale(f"{layout.frozen_eval_file(run.path)}: {why}")
    return {"knn": knn, "shots": shots}


def _cell(values: list[float]) -> str:
    mean, std, _ = stats(values)
    return f"{100 * mean:.2f}" + ("" if std is None else f" ± {100 * std:.2f}")


def frozen_table(runs: list[Run], warn: Callable[[str], None]) -> tuple[list[str], list[list[str]], list[dict]]:
    """Per dataset, backbone and method: k-NN and each shot count's SimpleShot (mean over its episodes),
    mean ± std over seeds. A frozen_eval.json that cannot be read is named through `warn`."""
    found: dict[tuple, dict[int, dict]] = {}
    for r in runs:
        if r.variant not in MAIN_VARIANTS:
            continue
        try:
            data = _read(r)
        except Unreadable as err:
            warn(f"{err}; left out of the frozen-feature table (rerun `clipit evaluate --frozen` after deleting it)")
            continue
        except Stale as err:
            warn(f"{err}; left out of the frozen-feature table (rerun `clipit evaluate --frozen` on it)")
            continue
        if data is not None:
            found.setdefault((r.dataset, r.backbone, r.kind), {})[r.seed] = data
    shots = sorted({n for cell in found.values() for d in cell.values() for n in d["shots"]})
    header = ["Dataset", "Vision backbone", "Method", "Seeds", "k-NN (k=20)"] + [f"{n}-shot" for n in shots]
    rows, records = [], []
    datasets = order({k[0] for k in found}, DATASET_NAMES)
    backbones = order({k[1] for k in found}, BACKBONE_NAMES)
    kinds = kind_order({k[2] for k in found})
    for d, b, kind in sorted(found, key=lambda k: (datasets.index(k[0]), backbones.index(k[1]), kinds.index(k[2]))):
        seeds = found[(d, b, kind)]
        knn = [s["knn"] for s in seeds.values()]
        row = [DATASET_NAMES.get(d, d), BACKBONE_NAMES.get(b, b), method_label(kind), str(len(seeds)), _cell(knn)]
        mean, std, n = stats(knn)
        record = {"dataset": d, "backbone": b, "kind": kind, "n": n, "knn_mean": mean, "knn_std": std}
        for shot in shots:
            values = [s["shots"][shot] for s in seeds.values() if shot in s["shots"]]
            row.append(_cell(values) if values else "–")
            m, sd, _ = stats(values) if values else (None, None, 0)
            record |= {f"shot{shot}_mean": m, f"shot{shot}_std": sd}
        rows.append(row)
        records.append(record)
    return header, rows, records
