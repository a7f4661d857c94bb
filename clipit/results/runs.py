"""Finding and naming finished runs: every directory under a root that holds a metrics.json.

Labels come from the grid ledger (`state.json`: the cell's axes) when present, otherwise from the
run's config.yaml (model.backbone, data.name) and its path (clipit/layout.py). Symlinked warm starts
are not followed, so a reused unimodal probe counts once.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from clipit import layout

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


def order(values, names: dict) -> list[str]:
    """Known names in the paper's order, then the others sorted."""
    known = [v for v in names if v in values]
    return known + sorted(v for v in values if v not in names)


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
    metrics = _read_json(layout.metrics_file(run_dir))
    if metrics is None:
        return None
    cfg = _read_yaml(layout.config_file(run_dir))
    state = _read_json(layout.state_file(run_dir)) or {}
    cell = state.get("cell") or {}
    axes = dict(cell.get("axes") or {})
    where = layout.parse_run_dir(run_dir)  # None outside <output_dir>/runs/<method>/seed-<n>
    method = cell.get("method") or metrics.get("method") or (where.method if where else run_dir.parent.name)
    seed = cell.get("seed")
    if seed is None:
        seed = where.seed if where else 0
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
        dirnames[:] = sorted(d for d in dirnames if d not in layout.NOT_RUNS)
        here = Path(dirpath)
        if layout.METRICS in filenames:
            run = load_run(here)
            if run is not None:
                runs.append(run)
        elif layout.STATE in filenames:
            state = _read_json(layout.state_file(here))
            if state:
                states.append(state | {"run_dir": str(here)})
    return runs, states


def main_runs(runs: list[Run], backbone: str, dataset: str, which: str) -> list[Run]:
    """Table 1's unimodal or CLIP-IT runs of one backbone and dataset (main variant only)."""
    pick = [r for r in runs if r.backbone == backbone and r.dataset == dataset and r.variant in MAIN_VARIANTS
            and r.kind == which]
    named = [r for r in pick if r.method == which]
    return named or pick
