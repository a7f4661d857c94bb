"""Finding and naming finished runs: every directory under a root that holds a metrics.json.

Labels come from the grid ledger (`state.json`: the cell's axes) when present, otherwise from the
run's config.yaml (model.backbone, data.name) and its path (clipit/layout.py). Symlinked warm starts
are not followed, so a reused unimodal probe counts once. A run whose files exist but cannot be read
(malformed JSON or YAML, no numeric metrics) is left out with a warning naming the file: its numbers
or its labels would be guesses.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from clipit import layout
from clipit.io import read_json_object
from clipit.methods import in_group, known_spec, report_order

log = logging.getLogger(__name__)

METRICS = ("balanced_accuracy", "accuracy")  # what every table reads from a run's metrics.json
MAIN_VARIANTS = ("", "full", "baseline", "main")
BACKBONE_NAMES = {  # paper's names (method.md Table 1), in the paper's row order
    "uni": "UNI",
    "kaiko-vitl14": "DINO (ViT-L/14)",
    "kaiko-vitb16": "VITB-16",
    "kaiko-vits16": "VITS-16",
    "kaiko-vitb8": "VITB-8",
    "kaiko-vits8": "VITS-8",
}
DATASET_NAMES = {"pcam": "PCAM", "bach": "BACH", "crc": "CRC"}


def method_label(kind: str) -> str:
    """A method kind's report label (clipit/methods.py); a kind not registered (an old or foreign run),
    spaced."""
    spec = known_spec(kind)
    return spec.label if spec else kind.replace("_", " ")


def vision_kinds() -> tuple[str, ...]:
    """Table 1's kinds (report group "main"): the vision model alone at test time."""
    return in_group("main")


def has_images(kind: str) -> bool:
    """Whether a kind's model sees images (its runs have a backbone); unknown kinds are assumed to."""
    spec = known_spec(kind)
    return spec is None or spec.vision is not None


def kind_order(kinds) -> list[str]:
    """Kinds in the registry's report order, then unregistered ones sorted."""
    return order(kinds, dict.fromkeys(report_order()))


def variant_label(variant: str) -> str:
    """A readable row label for a variant name without a grid `label` (e.g. report-rank-2 -> report rank 2)."""
    return variant.replace("-", " ").replace("_", " ")


@dataclass
class Run:
    path: Path
    backbone: str
    dataset: str
    variant: str  # configuration label from the grid's other axes ("" for the main runs)
    method: str  # method name in the config
    kind: str  # the registered method (clipit/methods.py) that methods.<method>.method names
    seed: int
    metrics: dict
    label: str = ""  # the variant's row label (grid `label`, else derived from its name)
    compare_to: str = ""  # the variant this one varies (grid `compare_to`); "" = the main runs
    axes: dict | None = None  # the grid axes other than backbone and dataset
    best_val: dict | None = None  # val metrics of the selected checkpoint (train_summary.json)
    warm_start: str = ""  # the method whose best checkpoint initialised this run (same seed), "" for none

    def value(self, metric: str) -> float:
        return float(self.metrics[metric])

    @property
    def params(self) -> int | None:
        """Parameters that run at test time: the merged model, plus whatever else must run for its input
        (the pairing CLIP's image encoder that retrieves the report of a multimodal baseline, a text
        tower that encodes class prompts) as recorded by evaluation under `parameters.extra_inference`."""
        p = self.metrics.get("parameters") or {}
        base = p.get("inference", p.get("total"))  # merged LoRA adds no parameters at inference
        return None if base is None else int(base) + int(p.get("extra_inference") or 0)


def order(values, names: dict) -> list[str]:
    """Known names in the paper's order, then the others sorted."""
    known = [v for v in names if v in values]
    return known + sorted(v for v in values if v not in names)


def warn_to_log(message: str) -> None:
    log.warning("%s", message)


class Unreadable(Exception):
    """A run's file exists but cannot be used; the message names it and says why (the run is left out)."""

    def __init__(self, path: Path, why: str):
        super().__init__(f"{path}: {why}")
        self.path = Path(path)


def _read_json(path: Path) -> dict | None:
    """The JSON object in `path`; None when the file does not exist; Unreadable when it is not one."""
    return read_json_object(path, error=Unreadable, missing_ok=True)


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except UnicodeDecodeError:
        raise Unreadable(path, "not UTF-8 text") from None
    except yaml.YAMLError as err:
        raise Unreadable(path, f"not valid YAML ({' '.join(str(err).split())[:200]})") from None
    except OSError as err:
        raise Unreadable(path, f"cannot read ({err.strerror or type(err).__name__})") from None
    if data is not None and not isinstance(data, dict):
        raise Unreadable(path, f"holds a YAML {type(data).__name__}, not a mapping of sections")
    return data or {}


def _check_metrics(path: Path, metrics: dict) -> None:
    for key in METRICS:
        value = metrics.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise Unreadable(path, f"{key} is {value!r}, not a finite number")
    if not isinstance(metrics.get("parameters") or {}, dict):
        raise Unreadable(path, f"parameters is {metrics['parameters']!r}, not a mapping")
    for key, value in (metrics.get("parameters") or {}).items():
        if value is None or key == "extra_inference_from":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise Unreadable(path, f"parameters.{key} is {value!r}, not a count of parameters")


def variant_name(axes: dict) -> str:
    """The configuration label of a cell's axes other than backbone and dataset: "" for the main runs
    (every value in MAIN_VARIANTS), the value for one axis, else axis=value pairs."""
    if all(str(v) in MAIN_VARIANTS for v in axes.values()):
        return ""
    if len(axes) == 1:
        return str(next(iter(axes.values())))
    return ",".join(f"{k}={v}" for k, v in axes.items())


def load_run(run_dir: Path) -> Run | None:
    """The run in `run_dir`; None without a metrics.json; Unreadable (naming the file) when its
    metrics.json, state.json or config.yaml exists but cannot be used: a report never guesses labels."""
    metrics_path = layout.metrics_file(run_dir)
    metrics = _read_json(metrics_path)
    if metrics is None:
        return None
    _check_metrics(metrics_path, metrics)
    cfg = _read_yaml(layout.config_file(run_dir))
    state = _read_json(layout.state_file(run_dir)) or {}
    try:
        cell = state.get("cell") or {}
        axes = dict(cell.get("axes") or {})
        labels = dict(cell.get("axis_labels") or {})
        compare = dict(cell.get("compare_to") or {})
        where = layout.parse_run_dir(run_dir)  # None outside <output_dir>/runs/<method>/seed-<n>
        method = cell.get("method") or metrics.get("method") or (where.method if where else run_dir.parent.name)
        seed = cell.get("seed")
        if seed is None:
            seed = where.seed if where else 0
        seed = int(seed)
    except (AttributeError, TypeError, ValueError) as err:
        raise Unreadable(layout.state_file(run_dir), f"unexpected content ({type(err).__name__}: {err})") from None
    try:
        method_cfg = (cfg.get("methods") or {}).get(method) or {}
        kind = method_cfg.get("method") or cell.get("kind") or method
        clip = axes.pop("clip", None)  # the CLIP-based baselines: the CLIP is the model
        spec = known_spec(str(kind))
        if spec is not None and spec.uses_clip:  # their model is the CLIP (grid axis `clip`, else clip.model)
            axes.pop("backbone", None)  # model.backbone takes no part in them
            backbone = clip or (cfg.get("clip") or {}).get("model") or (cfg.get("pairing") or {}).get("model", "?")
        else:
            backbone = axes.pop("backbone", None) or (cfg.get("model") or {}).get("backbone", "?")
        dataset = axes.pop("dataset", None) or (cfg.get("data") or {}).get("name", "?")
    except (AttributeError, TypeError) as err:
        raise Unreadable(layout.config_file(run_dir), f"unexpected content ({type(err).__name__}: {err})") from None
    # Any other axis (ablation, variant, ...) labels the configuration; values such as "full" mark the
    # main runs (Table 1), which get the empty label.
    variant = variant_name(axes)
    if not cell and method != kind:  # outside a grid, a renamed method (e.g. clipit_no_text) is a variant
        variant = str(method)
    label = (
        ", ".join(str(labels.get(k) or variant_label(str(v))) for k, v in axes.items() if str(v) not in MAIN_VARIANTS)
        if variant and cell
        else variant_label(variant)
    )
    # the variant this one varies: the same combination with the compared value(s) swapped in
    compare_to = variant_name({k: compare.get(k, v) for k, v in axes.items()}) if compare else ""
    summary = _read_json(layout.train_summary(run_dir)) or {}
    best_val = summary.get("best_val") if isinstance(summary.get("best_val"), dict) else None
    return Run(
        run_dir,
        str(backbone),
        str(dataset),
        variant,
        str(method),
        str(kind),
        seed,
        metrics,
        label=label,
        compare_to=compare_to,
        axes=axes,
        best_val=best_val,
        warm_start=str(method_cfg.get("warm_start") or ""),
    )


_FIX = {  # what to do about each of a run's files when it cannot be read
    layout.METRICS: "fix it, or delete it and rerun `clipit evaluate` for this run",
    layout.STATE: "fix it, or delete it: the labels then come from config.yaml and the run's path",
    layout.CONFIG: "fix it: it is the run's resolved config, written by `clipit train`",
}


def find_runs(root: str | Path, warn: Callable[[str], None] = warn_to_log) -> tuple[list[Run], list[dict]]:
    """(finished runs, ledger states of cells without metrics) under `root` (symlinks not followed).

    A run whose metrics.json, state.json or config.yaml cannot be used is left out, and `warn` gets
    one line naming the file; so does a cell's unreadable state.json (left out of the grid status)."""
    runs, states = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in layout.NOT_RUNS)
        here = Path(dirpath)
        if layout.METRICS in filenames:
            try:
                run = load_run(here)
            except Unreadable as err:
                warn(f"{err}; run left out of the report ({_FIX.get(err.path.name, 'fix the file')})")
                continue
            if run is not None:
                runs.append(run)
        elif layout.STATE in filenames:
            try:
                state = _read_json(layout.state_file(here))
            except Unreadable as err:
                warn(f"{err}; cell left out of the grid status (`clipit grid` treats it as unknown)")
                continue
            if state:
                states.append(state | {"run_dir": str(here)})
    return drop_duplicate_cells(runs, warn), states


def drop_duplicate_cells(runs: list[Run], warn: Callable[[str], None]) -> list[Run]:
    """One run per cell and seed: a second run that claims the same backbone, dataset, variant, method and
    seed (a copied run folder, two roots) would count its seed twice in the mean ± std; it is left out,
    named."""
    kept: dict[tuple, Run] = {}
    for run in runs:
        cell = (run.backbone, run.dataset, run.variant, run.method, run.kind, run.seed)
        if cell in kept:
            warn(
                f"{run.path}: claims the same cell and seed as {kept[cell].path} ({run.method}, {run.backbone}, "
                f"{run.dataset}, seed {run.seed}); left out so that the seed counts once: move or delete one"
            )
            continue
        kept[cell] = run
    return list(kept.values())


def main_runs(runs: list[Run], backbone: str, dataset: str, which: str) -> list[Run]:
    """Table 1's unimodal or CLIP-IT runs of one backbone and dataset (main variant only)."""
    pick = [
        r
        for r in runs
        if r.backbone == backbone and r.dataset == dataset and r.variant in MAIN_VARIANTS and r.kind == which
    ]
    named = [r for r in pick if r.method == which]
    return named or pick
