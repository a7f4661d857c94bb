"""Export a trained run as a vision-only inference model, and load an export (clipit/evaluation/inference.py
predicts with it).

`clipit export RUN_DIR OUT_DIR` rebuilds the run's model exactly as evaluation does (backbone weights,
warm start, best checkpoint), merges every LoRA adapter into its base layer (W <- W + (alpha/r) B A,
then the adapter is replaced by the plain layer), and writes
    OUT_DIR/model.safetensors     all weights of backbone + W_v (+ P, H_t, F for CLIP-IT)
    OUT_DIR/backbone.safetensors  the backbone alone, timm's key names (timm backbones; export_card.py)
    OUT_DIR/config.json           how to rebuild it: backbone, method, classes, input size, mean/std, timm
                                  architecture and arguments, dataset and µm per input pixel, provenance
    OUT_DIR/README.md             the model card: method, backbone, training data, metrics, provenance
A copied export is self-contained (predict needs no training run; version-1 exports still load, their
dataset read from the source run's config.yaml). The exported model has no peft, no text branch and no dependency on the training config or on
pretrained weight files; a CLIP-IT export runs at the unimodal model's cost plus P, H_t and F.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from clipit import layout
from clipit.config import load_config
from clipit.errors import ClipitError, output_setting
from clipit.evaluation.export_card import MODEL_CARD, dataset_resolution, model_card, timm_fields, training_fields
from clipit.identity import OVERWRITE, changed_output, identity_changes
from clipit.io import atomic_path, atomic_write_json, atomic_write_text, make_dirs, read_json_object, sha256_file
from clipit.methods import method_names, method_spec
from clipit.models import clip_baselines
from clipit.models.backbones import create_backbone, get_spec
from clipit.models.checkpoint import TEXT_TOWER, load_model_state, read_meta, read_tensors
from clipit.models.factory import build_classifier, build_model
from clipit.models.preprocess import DevicePreprocess
from clipit.progress import Progress, progress
from clipit.state_dict import load_strict

FORMAT = "clipit-export"
VERSION = 2  # 2: portable (dataset resolution, timm architecture, backbone.safetensors, model card, provenance)


class ExportError(ClipitError):
    """A run cannot be exported, or an export cannot be loaded (one line, names the file)."""


# ---------------------------------------------------------------------------------------------
# Rebuilding a trained run


def load_trained_run(run_dir: str | Path):
    """(model, preprocess, cfg, meta) of a finished run, as evaluation sees it (unmerged LoRA).

    A run that stored only its trainable tensors is rebuilt from the backbone weights recorded in
    its config.yaml plus its warm start (the sibling run of the same seed), then its best checkpoint.
    """
    run_dir = Path(run_dir)
    best = layout.best(run_dir)
    if not best.with_suffix(".json").exists() or not layout.config_file(run_dir).exists():
        raise ExportError(f"{run_dir}: not a finished run (needs config.yaml and best.json/best.safetensors)")
    if not layout.is_trained(run_dir):  # stopped mid-run (killed, non-finite loss): its best.* is not final
        raise ExportError(
            f"{layout.train_summary(run_dir)}: missing, so {run_dir} did not finish training; finish it "
            "with `clipit train` (it resumes) before exporting"
        )
    cfg = load_config(layout.config_file(run_dir))
    meta = read_meta(best)
    name = meta["method"]
    if name not in cfg.methods:
        raise ExportError(f"{run_dir}/config.yaml: has no method {name!r} (best.json names it)")
    tcfg = cfg.methods[name]
    warm = None
    if tcfg.warm_start and not meta.get("full_state", False):
        warm = layout.warm_start(run_dir, tcfg.warm_start)
        if not warm.with_suffix(".json").exists():
            raise ExportError(
                f"{warm}.json: warm start of {run_dir} is missing (its frozen base weights are not "
                "in the run's checkpoint); keep the runs/ tree together"
            )
    model, preprocess = build_model(
        cfg, tcfg, len(meta["classes"]), meta["text_dim"], warm_start=warm, text_tower=False
    )
    load_model_state(best, model, exclude=(TEXT_TOWER,))
    return model.eval(), preprocess, cfg, meta


def merge_lora(model: torch.nn.Module, show: bool = False) -> torch.nn.Module:
    """Fold every injected LoRA adapter into its base layer and put the plain layer back (in place)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, layer in progress(layers, desc="clipit export: merge LoRA", unit="layer", enabled=show):
        layer.merge(safe_merge=True)  # raises on NaNs instead of writing them into the weights
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.get_base_layer())
    return model


# ---------------------------------------------------------------------------------------------
# Export


def export_identity(run_dir: Path) -> dict:
    """What an export depends on: the trained run's identity (train_summary.json: its config keys, warm
    start and shard set; not the process count) and the sha256 of its selected checkpoint."""
    summary = read_json_object(layout.train_summary(run_dir), "finish it with `clipit train` (it resumes)")
    identity = {k: v for k, v in (summary.get("identity") or {}).items() if k != "processes"}
    return identity | {"best_sha256": sha256_file(layout.best(run_dir).with_suffix(".safetensors"))}


def current_export(run_dir: str | Path, out_dir: str | Path, overwrite: bool = False) -> bool:
    """True when `out_dir` holds the export of this run already (same identity): nothing to do. An export
    of another run or config stops with one line naming the changed keys, unless `overwrite` (then False,
    as for no export or one that recorded no identity: it is written again)."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    config_path = out_dir / "config.json"
    trained = layout.is_trained(run_dir) and layout.best(run_dir).with_suffix(".safetensors").is_file()
    if not (trained and config_path.is_file() and (out_dir / "model.safetensors").is_file()):
        return False  # nothing to compare (or an unfinished run: exporting it says so)
    stored = read_json_object(config_path, f"delete {out_dir} and {REEXPORT}").get("identity")
    if not isinstance(stored, dict):
        return False
    changes = identity_changes(stored, export_identity(run_dir))
    if not changes:
        return True
    if overwrite:
        return False
    raise changed_output(
        config_path,
        f"the export in {out_dir} was made",
        changes,
        "give `clipit export` another OUT_DIR",
        f"rerun `clipit export RUN_DIR OUT_DIR` with `{OVERWRITE}`",
    )


def export_run(run_dir: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Export `run_dir` into `out_dir` (see `export_or_keep`)."""
    return export_or_keep(run_dir, out_dir, overwrite)[0]


def export_or_keep(run_dir: str | Path, out_dir: str | Path, overwrite: bool = False) -> tuple[Path, bool]:
    """(out_dir, written): export `run_dir` into `out_dir`, its stages on stderr (clipit/progress.py). An
    export of this run already there is kept (current_export: written False); one of another run or config
    needs `overwrite`. One identity check (it hashes the checkpoint)."""
    if current_export(run_dir, out_dir, overwrite):
        return Path(out_dir), False
    # a full disk or a read-only folder names the command's own argument (there is no output_dir here)
    with output_setting("give `clipit export` another OUT_DIR"):
        with Progress(total=3, desc="clipit export", unit="stage", every=3) as stages:
            return _export_run(Path(run_dir), Path(out_dir), stages), True


def _export_run(run_dir: Path, out_dir: Path, stages: Progress) -> Path:
    stages.note(f"rebuilding {run_dir}")
    model, preprocess, cfg, meta = load_trained_run(run_dir)
    spec = method_spec(cfg.methods[meta["method"]].method)
    if not spec.exportable:
        vision_only = ", ".join(n for n in method_names() if method_spec(n).exportable)
        why = "uses the paired report at test time" if spec.text_at_test else "has no vision model"
        raise ExportError(
            f"{run_dir}: method {meta['method']!r} {why}; only vision-only methods ({vision_only}) can be exported"
        )
    stages.update()
    stages.note("merging LoRA into the base weights")
    merge_lora(model, show=True)
    stages.update()
    stages.note(f"writing {out_dir}")
    for p in model.parameters():
        p.requires_grad_(False)
    tcfg = cfg.methods[meta["method"]]
    config = {
        "format": FORMAT,
        "version": VERSION,
        "method": tcfg.method,
        "run_method": meta["method"],
        "backbone": cfg.model.backbone,
        "model_image_size": cfg.model.image_size,
        "timm_kwargs": dict(cfg.model.timm_kwargs),  # a timm: backbone's options (absent in older exports: none)
        "input_size": preprocess.size,
        "mean": preprocess.mean.flatten().tolist(),
        "std": preprocess.std.flatten().tolist(),
        "classes": list(meta["classes"]),
        "text_dim": meta["text_dim"],
        "kd_layers": cfg.model.kd_layers,
        "num_features": int(model.backbone.num_features),
        "backbone_weights": cfg.model.weights,
        "source_run": str(run_dir.resolve()),
        "seed": meta.get("seed"),
        "step": meta.get("step"),
        "parameters": sum(p.numel() for p in model.parameters()),
        "identity": export_identity(run_dir),  # what a rerun compares before it keeps this export
    }
    clip_tower = spec.uses_clip or hasattr(model.backbone, "clip_architecture")  # a CLIP method, or clip:<name>
    if clip_tower:  # the CLIP's vision tower: its architecture, and the cost record
        config |= clip_baselines.export_fields(model, run_dir)
    # portable: dataset resolution, timm architecture, training data, metrics, provenance (export_card.py)
    config |= dataset_resolution(str(cfg.data.name), preprocess.size)
    config |= timm_fields(cfg, clip_tower) | training_fields(cfg, run_dir, tcfg)
    make_dirs(out_dir)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    files = {"model.safetensors": state}
    if config["backbone_file"]:  # the backbone alone, under timm's own key names
        files[config["backbone_file"]] = {
            k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")
        }
    for name, tensors in files.items():
        with atomic_path(out_dir / name) as tmp:
            save_file(tensors, str(tmp), metadata={"format": FORMAT})
    config["provenance"]["export"]["sha256"] = {name: sha256_file(out_dir / name) for name in files}
    atomic_write_text(out_dir / MODEL_CARD, model_card(config))
    atomic_write_json(out_dir / "config.json", config)  # last: marks a complete export
    stages.update()
    return out_dir


REEXPORT = "re-export with `clipit export RUN_DIR OUT_DIR`"


def check_export_config(config: dict, path: Path) -> None:
    """The numbers predict takes from an export's config.json, each in range, else one line naming the key:
    a 0-px input or a 2-channel normalisation would otherwise fail far away, under another name."""

    def bad(key: str, what: str) -> ExportError:
        return ExportError(f"{path}: {key} = {config.get(key)!r} is not {what}; {REEXPORT}")

    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    size = config["input_size"]
    if not (isinstance(size, int) and not isinstance(size, bool) and 1 <= size <= 8192):
        raise bad("input_size", "a side in pixels from 1 to 8192")
    for key in ("mean", "std"):
        values = config[key]
        if not (isinstance(values, list) and len(values) == 3 and all(number(v) for v in values)):
            raise bad(key, "3 finite numbers (one per RGB channel)")
    if any(v <= 0 for v in config["std"]):
        raise bad("std", "3 positive numbers")
    classes = config["classes"]
    if not (isinstance(classes, list) and len(classes) >= 2 and all(isinstance(c, str) and c for c in classes)):
        raise bad("classes", "a list of at least 2 class names")
    if len(set(classes)) != len(classes):
        raise bad("classes", "a list of distinct class names")
    if config.get("field_um") is not None and not (number(config["field_um"]) and config["field_um"] > 0):
        raise bad("field_um", "a positive number of µm (or null)")
    options = config.get("timm_kwargs", {})
    if not (isinstance(options, dict) and all(isinstance(k, str) for k in options)):
        raise bad("timm_kwargs", "a mapping of timm create_model options")


def load_exported(model_dir: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode, DevicePreprocess, config) from an export directory."""
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.exists() or not (model_dir / "model.safetensors").exists():
        raise ExportError(
            f"{model_dir}: not a clipit export (needs config.json and model.safetensors; "
            "make one with `clipit export RUN_DIR OUT_DIR`)"
        )
    config = read_json_object(
        config_path,
        "re-export with `clipit export RUN_DIR OUT_DIR`",
        error=lambda path, why: ExportError(f"{path}: unreadable: {why}"),
    )
    if config.get("format") != FORMAT or config.get("version", 0) > VERSION:
        raise ExportError(
            f"{config_path}: format {config.get('format')!r} v{config.get('version')} is not {FORMAT} v<={VERSION}"
        )
    missing = [
        k
        for k in (
            "backbone",
            "model_image_size",
            "method",
            "classes",
            "text_dim",
            "kd_layers",
            "input_size",
            "mean",
            "std",
        )
        if k not in config
    ]
    if missing:
        raise ExportError(f"{config_path}: lacks {', '.join(missing)}; {REEXPORT}")
    check_export_config(config, config_path)
    if "clip_architecture" in config:  # a CLIP baseline: the CLIP's vision tower, not a registry backbone
        backbone = clip_baselines.vision_from_architecture(config["clip_architecture"])
    else:
        backbone = create_backbone(get_spec(config["backbone"], config.get("timm_kwargs")), config["model_image_size"])
    model = build_classifier(
        config["method"], backbone, len(config["classes"]), config["text_dim"], config["kd_layers"]
    )
    state = read_tensors(model_dir / "model.safetensors", ExportError, REEXPORT)
    load_strict(
        model,
        state,
        model_dir / "model.safetensors",
        f"{config['backbone']}/{config['method']}",
        "re-export it with `clipit export RUN_DIR OUT_DIR`",
        ExportError,
    )
    preprocess = DevicePreprocess(config["input_size"], config["mean"], config["std"])
    return model.eval().to(device), preprocess.to(device), config
