"""`clipit report RUNS_DIR`: aggregate finished runs into the paper's tables and figures.

Every directory under RUNS_DIR that holds a metrics.json is a run (symlinked warm starts are not
followed, so a reused unimodal probe counts once). Its labels come from the grid ledger
(`state.json`: the cell's axes) when present, otherwise from its config.yaml (model.backbone,
data.name) and its path (`runs/<method>/seed-<n>`). Writes into `--out` (default RUNS_DIR/report):

    report.md        Table 1 (unimodal vs CLIP-IT per backbone x dataset, mean ± std over seeds, Δ),
                     ablations, Ω, grid status, figure links
    table1.csv, ablations.csv, omega.csv, runs.csv
    pareto.png       accuracy vs parameter count per dataset (with the Pareto frontier)
    omega.png        Ω x 100 per dataset and backbone
    curves-<dataset>.png   training loss and validation balanced accuracy from the TensorBoard files

Ω (method.md §2) = fraction of test samples the text-only model (method kind `text`, fed the test
image's retrieved report) gets right and the unimodal vision model gets wrong. Predictions are
matched by sample key, seed by seed (text run of the same dataset and seed; the text model does
not depend on the backbone).
"""
from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

MAIN_VARIANTS = ("", "full", "baseline", "main")
BACKBONE_NAMES = {  # paper's names (method.md Table 1), in the paper's row order
    "uni": "UNI", "kaiko-vitl14": "DINO (ViT-L/14)", "kaiko-vitb16": "VITB-16", "kaiko-vits16": "VITS-16",
    "kaiko-vitb8": "VITB-8", "kaiko-vits8": "VITS-8",
}
DATASET_NAMES = {"pcam": "PCAM", "bach": "BACH", "crc": "CRC"}
METHOD_NAMES = {"unimodal": "Unimodal", "clipit": "CLIP-IT", "text": "text-only", "late_fusion": "late fusion",
                "early_fusion": "early fusion"}


@dataclass
class Run:
    path: Path
    backbone: str
    dataset: str
    variant: str  # configuration label from the grid's other axes ("" for the main runs)
    method: str  # method name in the config
    kind: str  # unimodal | clipit | text | late_fusion | early_fusion
    seed: int
    metrics: dict

    def value(self, metric: str) -> float:
        return float(self.metrics[metric])

    @property
    def params(self) -> int | None:
        p = self.metrics.get("parameters") or {}
        return p.get("inference", p.get("total"))  # merged LoRA adds no parameters at inference


def _read_yaml(path: Path) -> dict:
    try:
        return yaml.safe_load(path.read_text()) or {}
    except (FileNotFoundError, yaml.YAMLError):
        return {}


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def load_run(run_dir: Path) -> Run | None:
    metrics = _read_json(run_dir / "metrics.json")
    if metrics is None:
        return None
    cfg = _read_yaml(run_dir / "config.yaml")
    state = _read_json(run_dir / "state.json") or {}
    cell = state.get("cell") or {}
    axes = dict(cell.get("axes") or {})
    method = cell.get("method") or metrics.get("method") or run_dir.parent.name
    seed = cell.get("seed")
    if seed is None:
        name = run_dir.name
        seed = int(name.split("-", 1)[1]) if name.startswith("seed-") and name[5:].isdigit() else 0
    kind = ((cfg.get("methods") or {}).get(method) or {}).get("method") or cell.get("kind") or method
    backbone = axes.pop("backbone", None) or (cfg.get("model") or {}).get("backbone", "?")
    dataset = axes.pop("dataset", None) or (cfg.get("data") or {}).get("name", "?")
    # Any other axis (ablation, variant, ...) labels the configuration; values such as "full" mark the
    # main runs (Table 1), which get the empty label.
    if all(str(v) in MAIN_VARIANTS for v in axes.values()):
        variant = ""
    elif len(axes) == 1:
        variant = str(next(iter(axes.values())))
    else:
        variant = ",".join(f"{k}={v}" for k, v in axes.items())
    if not cell and method != kind:  # outside a grid, a renamed method (e.g. clipit_no_text) is a variant
        variant = str(method)
    return Run(run_dir, str(backbone), str(dataset), variant, str(method), str(kind), int(seed), metrics)


def find_runs(root: str | Path) -> tuple[list[Run], list[dict]]:
    """(finished runs, ledger states of cells without metrics) under `root` (symlinks not followed)."""
    runs, states = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("tb", "checkpoints", "submitit", "report"))
        here = Path(dirpath)
        if "metrics.json" in filenames:
            run = load_run(here)
            if run is not None:
                runs.append(run)
        elif "state.json" in filenames:
            state = _read_json(here / "state.json")
            if state:
                states.append(state | {"run_dir": str(here)})
    return runs, states


# ---------------------------------------------------------------------------------------------
# Tables


def _order(values, names: dict) -> list[str]:
    known = [v for v in names if v in values]
    return known + sorted(v for v in values if v not in names)


def _stats(values: list[float]) -> tuple[float, float, int]:
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0, len(a)


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


def main_runs(runs: list[Run], backbone: str, dataset: str, which: str) -> list[Run]:
    """Table 1's unimodal or CLIP-IT runs of one backbone and dataset (main variant only)."""
    pick = [r for r in runs if r.backbone == backbone and r.dataset == dataset and r.variant in MAIN_VARIANTS
            and r.kind == which]
    named = [r for r in pick if r.method == which]
    return named or pick


def table1(runs: list[Run], metric: str) -> tuple[list[str], list[list[str]], list[dict]]:
    vision = [r for r in runs if r.kind in ("unimodal", "clipit")]
    backbones = _order({r.backbone for r in vision}, BACKBONE_NAMES)
    datasets = _order({r.dataset for r in vision}, DATASET_NAMES)
    header = ["Vision backbone"]
    for d in datasets:
        name = DATASET_NAMES.get(d, d)
        header += [f"{name} Unimodal", f"{name} CLIP-IT", f"{name} Δ"]
    rows, records = [], []
    for b in backbones:
        row = [BACKBONE_NAMES.get(b, b)]
        for d in datasets:
            uni = main_runs(runs, b, d, "unimodal")
            cli = main_runs(runs, b, d, "clipit")
            su = _stats([r.value(metric) for r in uni]) if uni else None
            sc = _stats([r.value(metric) for r in cli]) if cli else None
            row += [_fmt(su), _fmt(sc), _delta(su, sc)]
            records.append({"backbone": b, "dataset": d,
                            "unimodal_mean": su and su[0], "unimodal_std": su and su[1], "unimodal_n": su and su[2],
                            "clipit_mean": sc and sc[0], "clipit_std": sc and sc[1], "clipit_n": sc and sc[2],
                            "delta": (sc[0] - su[0]) if su and sc else None})
        rows.append(row)
    return header, rows, records


def ablation_table(runs: list[Run], metric: str) -> tuple[list[str], list[list[str]], list[dict]]:
    """Every variant (and extra method) of each backbone x dataset that has more than Table 1's two."""
    header = ["Backbone", "Dataset", "Configuration", "Method", "Seeds", "Balanced accuracy" if metric ==
              "balanced_accuracy" else metric, "Δ vs unimodal", "Δ vs CLIP-IT"]
    rows, records = [], []
    groups: dict[tuple, dict[tuple, list[Run]]] = {}
    for r in runs:
        groups.setdefault((r.backbone, r.dataset), {}).setdefault((r.variant, r.method, r.kind), []).append(r)
    for (b, d) in sorted(groups, key=lambda k: (_order([k[0]], BACKBONE_NAMES), _order([k[1]], DATASET_NAMES), k)):
        entries = groups[(b, d)]
        extra = [k for k in entries if not (k[0] in MAIN_VARIANTS and k[2] in ("unimodal", "clipit", "text"))]
        if not extra:  # Table 1's runs (and the text-only model, reported with Omega) only
            continue
        uni = main_runs(runs, b, d, "unimodal")
        cli = main_runs(runs, b, d, "clipit")
        su = _stats([r.value(metric) for r in uni]) if uni else None
        sc = _stats([r.value(metric) for r in cli]) if cli else None
        main = [k for k in entries if k not in extra and k[2] != "text"]
        for key in sorted(main, key=lambda k: k[2] != "unimodal") + sorted(extra):
            variant, method, kind = key
            s = _stats([r.value(metric) for r in entries[key]])
            label = variant if variant not in MAIN_VARIANTS else (
                "unimodal (linear probe)" if kind == "unimodal" else "CLIP-IT (full)" if kind == "clipit"
                else METHOD_NAMES.get(kind, kind))
            rows.append([BACKBONE_NAMES.get(b, b), DATASET_NAMES.get(d, d), label, method, str(s[2]), _fmt(s),
                         _delta(su, s), _delta(sc, s)])
            records.append({"backbone": b, "dataset": d, "variant": variant, "method": method, "kind": kind,
                            "mean": s[0], "std": s[1], "n": s[2],
                            "delta_unimodal": (s[0] - su[0]) if su else None,
                            "delta_clipit": (s[0] - sc[0]) if sc else None})
    return header, rows, records


def load_predictions(run: Run, split: str = "test") -> dict | None:
    path = run.path / f"predictions-{split}.npz"
    if not path.exists():
        return None
    with np.load(path) as data:
        return {"keys": np.asarray(data["keys"]).astype(str), "labels": np.asarray(data["labels"]),
                "pred": np.asarray(data["logits"]).argmax(axis=1)}


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


def omega_table(runs: list[Run]) -> tuple[list[str], list[list[str]], list[dict]]:
    text_runs: dict[tuple, list[Run]] = {}
    for r in runs:
        if r.kind == "text" and r.variant in MAIN_VARIANTS:
            text_runs.setdefault(r.dataset, []).append(r)
    header = ["Backbone", "Dataset", "Ω × 100 (mean ± std)", "Seeds", "Matched test samples"]
    rows, records = [], []
    vision = [r for r in runs if r.kind == "unimodal" and r.variant in MAIN_VARIANTS]
    for b in _order({r.backbone for r in vision}, BACKBONE_NAMES):
        for d in _order({r.dataset for r in vision if r.backbone == b}, DATASET_NAMES):
            texts = text_runs.get(d, [])
            if not texts:
                continue
            values, matched, seeds = [], [], []
            for v in sorted(main_runs(runs, b, d, "unimodal"), key=lambda r: r.seed):
                same = [t for t in texts if t.seed == v.seed and t.backbone == b] or \
                       [t for t in texts if t.seed == v.seed]
                if not same:
                    continue
                tp, vp = load_predictions(same[0]), load_predictions(v)
                if tp is None or vp is None:
                    continue
                value, n = omega(tp, vp)
                values.append(value)
                matched.append(n)
                seeds.append(v.seed)
            if not values:
                continue
            s = _stats(values)
            rows.append([BACKBONE_NAMES.get(b, b), DATASET_NAMES.get(d, d), _fmt(s), str(len(values)),
                         str(min(matched)) if len(set(matched)) == 1 else f"{min(matched)}–{max(matched)}"])
            records.append({"backbone": b, "dataset": d, "omega_mean": s[0], "omega_std": s[1], "n_seeds": s[2],
                            "seeds": " ".join(map(str, seeds)), "matched": min(matched)})
    return header, rows, records


def text_table(runs: list[Run], metric: str) -> list[list[str]]:
    rows = []
    texts = [r for r in runs if r.kind == "text" and r.variant in MAIN_VARIANTS]
    for d in _order({r.dataset for r in texts}, DATASET_NAMES):
        s = _stats([r.value(metric) for r in texts if r.dataset == d])
        rows.append([DATASET_NAMES.get(d, d), str(s[2]), _fmt(s)])
    return rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(path: Path, records: list[dict]) -> None:
    buf = io.StringIO()
    fields = list(dict.fromkeys(k for r in records for k in r)) if records else ["empty"]
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    for r in records:
        writer.writerow({k: ("" if v is None else v) for k, v in r.items()})
    from clipit.io import atomic_write_text

    atomic_write_text(path, buf.getvalue())


def run_records(runs: list[Run]) -> list[dict]:
    return [{"backbone": r.backbone, "dataset": r.dataset, "variant": r.variant, "method": r.method, "kind": r.kind,
             "seed": r.seed, "balanced_accuracy": r.metrics.get("balanced_accuracy"),
             "accuracy": r.metrics.get("accuracy"), "params_total": r.params,
             "params_trainable": (r.metrics.get("parameters") or {}).get("trainable"), "run_dir": str(r.path)}
            for r in sorted(runs, key=lambda r: (r.dataset, r.backbone, r.variant, r.method, r.seed))]


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


def build_report(root: str | Path, out: str | Path | None = None, metric: str = "balanced_accuracy",
                 plots: bool = True) -> dict:
    """Write the report files; returns {"runs": n, "files": [...], "table1": records, ...}."""
    from clipit.io import atomic_write_text

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such directory")
    out = Path(out) if out else root / "report"
    out.mkdir(parents=True, exist_ok=True)
    runs, states = find_runs(root)
    h1, r1, rec1 = table1(runs, metric)
    ha, ra, reca = ablation_table(runs, metric)
    ho, ro, reco = omega_table(runs)
    files = []
    for name, records in (("table1.csv", rec1), ("ablations.csv", reca), ("omega.csv", reco),
                          ("runs.csv", run_records(runs))):
        write_csv(out / name, records)
        files.append(out / name)
    figures = []
    if plots and runs:
        from clipit import plots as P

        figures += P.pareto(runs, metric, out / "pareto.png")
        if reco:
            figures += P.omega_bars(reco, out / "omega.png")
        figures += P.training_curves(runs, out)
    files += figures
    metric_name = "balanced accuracy" if metric == "balanced_accuracy" else metric
    md = [f"# CLIP-IT results: {root}", "",
          f"{len(runs)} finished runs. Numbers are test {metric_name} in %, mean ± std over seeds (std with ddof=1); "
          "Δ is CLIP-IT minus unimodal in points.", ""]
    md += ["## Table 1: unimodal vs CLIP-IT", "", markdown_table(h1, r1) if r1 else "(no unimodal/CLIP-IT runs)", ""]
    if ra:
        md += ["## Ablations", "", markdown_table(ha, ra), ""]
    md += ["## Ω: text right, vision wrong", ""]
    texts = text_table(runs, metric)
    if texts:
        md += ["Text-only model (the paired report's embedding -> MLP; test images use their retrieved report):", "",
               markdown_table(["Dataset", "Seeds", metric_name], texts), ""]
    md += [markdown_table(ho, ro) if ro else "(needs text-only runs, method kind `text`, next to the unimodal "
                                             "runs of the same dataset and seed)", ""]
    status = status_lines(states)
    if status:
        md += ["## Grid status", ""] + status + [""]
    if figures:
        md += ["## Figures", ""] + [f"![{f.stem}]({f.name})" for f in figures] + [""]
    atomic_write_text(out / "report.md", "\n".join(md))
    files.insert(0, out / "report.md")
    umask = os.umask(0)
    os.umask(umask)
    for f in files:  # atomic writes create 0600 files; a report is meant to be shared
        os.chmod(f, 0o666 & ~umask)
    return {"runs": len(runs), "files": [str(f) for f in files], "table1": rec1, "ablations": reca, "omega": reco,
            "markdown": "\n".join(md)}
