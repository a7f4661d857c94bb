"""What makes an export portable: the fields of its config.json that need no training run around (dataset
and its resolution, timm architecture and arguments, training data, provenance) and its model card,
README.md (clipit/evaluation/export.py writes both).

backbone.safetensors holds the merged backbone alone, under timm's own key names, so that an eva or timm
user needs neither clipit nor its prefixes:

    model = timm.create_model(cfg["timm"]["architecture"], pretrained=False, **cfg["timm"]["kwargs"])
    model.load_state_dict(safetensors.torch.load_file("backbone.safetensors"), strict=True)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from clipit import layout
from clipit.config import ExperimentConfig
from clipit.evaluation.slide import TRAINING_FIELD_UM
from clipit.methods import method_spec
from clipit.models.backbones import get_spec, timm_create_args
from clipit.provenance import clipit_version, git_state, read_provenance, summary_line

BACKBONE_FILE = "backbone.safetensors"
MODEL_CARD = "README.md"
METRIC_KEYS = ("balanced_accuracy", "accuracy", "macro_f1", "auroc", "loss")


def dataset_resolution(dataset: str, input_size: int) -> dict:
    """The training dataset, the field of view (µm) of one model input and its µm per input pixel (None when
    the dataset's resolution is unknown, e.g. folder data)."""
    field = TRAINING_FIELD_UM.get(dataset.lower())
    return {
        "dataset": dataset,
        "field_um": field,
        "input_mpp": None if field is None else field / input_size,
    }


def timm_fields(cfg: ExperimentConfig, uses_clip: bool) -> dict:
    """`timm`: architecture and create_model arguments of the backbone, and the file with its weights; null
    for a backbone timm does not build (CONCH, a CLIP's vision tower)."""
    spec = get_spec(cfg.model.backbone, cfg.model.timm_kwargs)
    args = None if uses_clip else timm_create_args(spec, cfg.model.image_size)
    if args is None:
        return {"timm": None, "backbone_file": None}
    return {"timm": {"architecture": spec.arch, "kwargs": args}, "backbone_file": BACKBONE_FILE}


def headline_metrics(run_dir: Path) -> dict | None:
    """The run's test metrics (metrics.json, written by `clipit evaluate`), the headline numbers only."""
    try:
        metrics = json.loads(layout.metrics_file(run_dir).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(metrics, dict):
        return None
    found = {
        k: metrics[k]
        for k in METRIC_KEYS
        if isinstance(metrics.get(k), (int, float)) and math.isfinite(float(metrics[k]))
    }
    return found or None


def training_fields(cfg: ExperimentConfig, run_dir: Path, tcfg) -> dict:
    """Training data, report corpus and pairing model, the run's metrics and provenance."""
    record = read_provenance(run_dir)
    return {
        "experiment": cfg.name,
        "training": {
            "data_root": cfg.data.root,
            "corpus": {"path": cfg.reports.path, "organ": cfg.reports.organ, "projects": cfg.reports.projects},
            "pairing_model": cfg.pairing.model,
            "pairing_texts": cfg.pairing.texts,
            "text_encoder": tcfg.text_encoder,
            "finetune": method_spec(tcfg.method).finetune_shown(tcfg.finetune, cfg.model.lora.enabled),
            "lam": tcfg.lam,
            "epochs": tcfg.epochs,
        },
        "metrics": {"test": headline_metrics(run_dir)},
        "provenance": {"training": record, "export": {"clipit": clipit_version(), "git": git_state()}},
    }


METHOD_TEXT = {
    "clipit": (
        "CLIP-IT (arXiv 2504.16181): a vision classifier trained with privileged text. Each training image was "
        "paired with its most similar report of an unpaired corpus by a CLIP-style pairing model; the report "
        "embeddings were distilled into the vision branch (projection P, text head H_t, fusion F). At test time "
        "only the image is used; LoRA adapters are merged into the backbone."
    ),
    "unimodal": "A linear probe (or fine-tuned classifier) on the vision backbone: the CLIP-IT paper's unimodal baseline.",
}


def weights_line(record: dict | None) -> str:
    """role: location (sha256 prefix) of every weights file the training run read."""
    weights = (record or {}).get("weights") or {}
    if not weights:
        return "not recorded"
    return "; ".join(
        f"{role} `{w.get('location')}`" + (f" (sha256 {w['sha256'][:16]})" if w.get("sha256") else "")
        for role, w in weights.items()
    )


def model_card(config: dict) -> str:
    """README.md of an export: what it is, how to load it with clipit or with plain timm, and where it came from."""
    c, t = config, config.get("training") or {}
    corpus = t.get("corpus") or {}
    metrics = (c.get("metrics") or {}).get("test") or {}
    prov = (c.get("provenance") or {}).get("training")
    mpp = c.get("input_mpp")
    lines = [
        f"# {c['run_method']} ({c['method']}) on {c.get('dataset')}: {c['backbone']}",
        "",
        METHOD_TEXT.get(c["method"], f"Method {c['method']} of clipit (docs/methods.md)."),
        "",
        "| | |",
        "|---|---|",
        f"| backbone | `{c['backbone']}` (weights: `{c.get('backbone_weights')}`) |",
        f"| classes | {', '.join(c['classes'])} |",
        f"| input | {c['input_size']} px, mean {c['mean']}, std {c['std']}; short side resized (bilinear), centre crop |",
        f"| resolution | {c.get('field_um') or 'unknown'} µm per input, {f'{mpp:.4g} µm/px' if mpp else 'unknown µm/px'} |",
        f"| training data | `{c.get('dataset')}` at `{t.get('data_root')}` |",
        f"| report corpus | `{corpus.get('path')}` (organ {corpus.get('organ')}, projects {corpus.get('projects')}) |",
        f"| pairing model | `{t.get('pairing_model')}` ({t.get('pairing_texts')}); text side: {t.get('text_encoder')} |",
        f"| fine-tuning | {t.get('finetune')}, {t.get('epochs')} epochs, lambda {t.get('lam')}, seed {c.get('seed')}, step {c.get('step')} |",
        f"| test metrics | {', '.join(f'{k} {v:.4f}' for k, v in metrics.items()) if metrics else 'not evaluated'} |",
        f"| weights read | {weights_line(prov)} |",
        f"| provenance | {summary_line(prov) if prov else 'not recorded (a run from before provenance.json)'} |",
        "",
        "## Use",
        "",
        "```bash",
        "clipit predict . tiles/ --out predictions.csv     # images, folders, shard sets, whole slides",
        "```",
    ]
    if c.get("timm"):
        lines += [
            "",
            f"The backbone alone, with plain timm (`{BACKBONE_FILE}`: timm's key names, LoRA merged):",
            "",
            "```python",
            "import json, safetensors.torch, timm",
            'cfg = json.load(open("config.json"))',
            'backbone = timm.create_model(cfg["timm"]["architecture"], pretrained=False, **cfg["timm"]["kwargs"])',
            f'backbone.load_state_dict(safetensors.torch.load_file("{BACKBONE_FILE}"), strict=True)',
            "features = backbone(images)  # images: float NCHW at input_size, normalised with mean/std",
            "```",
        ]
        if c["method"] == "unimodal":
            lines += ["", "Logits: `features @ W.T + b` with `head.weight`, `head.bias` of model.safetensors."]
    lines += ["", "config.json holds every field above; provenance.training is the run's provenance.json.", ""]
    return "\n".join(lines)
