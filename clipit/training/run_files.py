"""The files every trained run leaves, in one place for the training loop and for the runs whose model
is saved as built without a training step (a method whose spec says it trains nothing, such as the
zero-shot classifier; an imported probe head): the
checkpoint sidecar (best.json) and, for the latter, the whole run (config.yaml, best checkpoint,
train_summary.json), so evaluation and export treat every run alike."""

from __future__ import annotations

import time
from pathlib import Path

from clipit import layout
from clipit.config import ExperimentConfig, dump_config
from clipit.io import atomic_write_json
from clipit.models.checkpoint import save_model


def checkpoint_meta(cfg: ExperimentConfig, method: str, seed: int, manifest: dict, image_size: int) -> dict:
    """The best checkpoint's sidecar: what rebuilds its model (plus `step`, added when it is saved)."""
    return {
        "method": method,
        "seed": seed,
        "classes": manifest["classes"],
        "backbone": cfg.model.backbone,
        "weights": cfg.model.weights,
        "text_dim": manifest["embedding"]["dim"],
        "train": vars(cfg.methods[method]).copy(),
        "lora": vars(cfg.model.lora).copy(),
        "kd_layers": cfg.model.kd_layers,
        "image_size": image_size,
    }


def save_as_built(
    cfg: ExperimentConfig,
    method: str,
    seed: int,
    run_dir: Path,
    model,
    preprocess,
    manifest: dict,
    accelerator,
    *,
    summary_extra: dict,
    meta_extra: dict,
    full: bool,
    message: str,
) -> dict:
    """Save `model` as the run's best checkpoint at step 0 with a train summary, each with its extra
    fields (what the run is instead of trained: saved_as_built, imported, ...). Rank 0 writes; every rank
    returns the summary."""
    start = time.time()
    summary = {
        "steps": 0,
        "best_step": 0,
        "select": cfg.methods[method].select,
        "world_size": accelerator.num_processes,
        "batches_per_epoch": 0,
        "resumed_from_step": None,
        "stopped_early_at_step": None,
        **summary_extra,
        "wall_s": 0.0,
    }
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, layout.config_file(run_dir))
        meta = checkpoint_meta(cfg, method, seed, manifest, preprocess.size) | {"step": 0} | meta_extra
        save_model(layout.best(run_dir), model, meta, full=full)
        summary["wall_s"] = round(time.time() - start, 2)
        atomic_write_json(layout.train_summary(run_dir), summary)
        print(f"[clipit train] {method} seed {seed}: {message} (nothing to train)", flush=True)
    accelerator.wait_for_everyone()
    return summary


def save_untrained(
    cfg: ExperimentConfig, method: str, seed: int, run_dir: Path, model, preprocess, manifest: dict, accelerator
) -> dict:
    """The "training" of a method that trains nothing (clipit/methods.py: trains=False): its model, as the
    builder made it (e.g. the CLIP prompt ensemble, class embeddings encoded once), is the best checkpoint."""
    total = sum(p.numel() for p in model.parameters())  # as evaluation counts them (nothing is LoRA here)
    counts = {"total": total, "trainable": 0}
    if hasattr(model, "inference_cost"):  # what else ran once for it (e.g. the text tower on the prompts)
        counts |= model.inference_cost({"inference": total})
    clip = getattr(model, "clip_identity", None)
    return save_as_built(
        cfg,
        method,
        seed,
        run_dir,
        model,
        preprocess,
        manifest,
        accelerator,
        summary_extra={"saved_as_built": cfg.methods[method].method, "parameters": counts},
        meta_extra={"clip": clip} if clip is not None else {},
        full=cfg.model.weights in (None, "random"),  # a CLIP's towers are never stored (checkpoint.save_model)
        message=f"{cfg.methods[method].method} model for {len(manifest['classes'])} classes saved as built",
    )
