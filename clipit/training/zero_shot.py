"""The "training" of method zero_shot: nothing trains. The prompt-ensemble classifier that
models/clip_baselines.py built (class embeddings encoded once from the prompts) is saved as the run's
best checkpoint, with the same run files as a trained run, so evaluation and export treat it alike."""
from __future__ import annotations

import time
from pathlib import Path

from clipit import layout
from clipit.config import ExperimentConfig, dump_config
from clipit.io import atomic_write_json
from clipit.models.checkpoint import save_model


def save_zero_shot(cfg: ExperimentConfig, method: str, seed: int, run_dir: Path, model, preprocess, manifest: dict,
                   accelerator) -> dict:
    start = time.time()
    tcfg = cfg.methods[method]
    total = sum(p.numel() for p in model.parameters())  # as evaluation counts them (nothing is LoRA here)
    counts = {"total": total, "trainable": 0} | model.inference_cost({"inference": total})
    summary = {"steps": 0, "best_step": 0, "select": tcfg.select, "world_size": accelerator.num_processes,
               "batches_per_epoch": 0, "resumed_from_step": None, "stopped_early_at_step": None,
               "zero_shot": True, "parameters": counts, "wall_s": 0.0}
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, layout.config_file(run_dir))
        meta = {"method": method, "seed": seed, "classes": manifest["classes"], "backbone": cfg.model.backbone,
                "weights": cfg.model.weights, "text_dim": manifest["embedding"]["dim"], "train": vars(tcfg).copy(),
                "lora": vars(cfg.model.lora).copy(), "kd_layers": cfg.model.kd_layers, "image_size": preprocess.size,
                "step": 0, "clip": model.clip_identity}
        save_model(layout.best(run_dir), model, meta, full=False)
        summary["wall_s"] = round(time.time() - start, 2)
        atomic_write_json(layout.train_summary(run_dir), summary)
        print(f"[clipit train] {method} seed {seed}: zero-shot classifier from {len(manifest['classes'])} class "
              f"prompt ensembles saved (nothing to train)", flush=True)
    accelerator.wait_for_everyone()
    return summary
