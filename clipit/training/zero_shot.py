"""The "training" of method zero_shot: nothing trains. The prompt-ensemble classifier that
models/clip_baselines.py built (class embeddings encoded once from the prompts) is saved as the run's
best checkpoint, with the same run files as a trained run, so evaluation and export treat it alike."""

from __future__ import annotations

from pathlib import Path

from clipit.config import ExperimentConfig
from clipit.training.run_files import save_as_built


def save_zero_shot(
    cfg: ExperimentConfig, method: str, seed: int, run_dir: Path, model, preprocess, manifest: dict, accelerator
) -> dict:
    total = sum(p.numel() for p in model.parameters())  # as evaluation counts them (nothing is LoRA here)
    counts = {"total": total, "trainable": 0} | model.inference_cost({"inference": total})
    return save_as_built(
        cfg,
        method,
        seed,
        run_dir,
        model,
        preprocess,
        manifest,
        accelerator,
        summary_extra={"zero_shot": True, "parameters": counts},
        meta_extra={"clip": model.clip_identity},
        full=False,
        message=f"zero-shot classifier from {len(manifest['classes'])} class prompt ensembles saved",
    )
