"""Resume checkpoints: everything needed to continue a run exactly where it stopped.

`<run_dir>/checkpoints/latest/` holds the trainable tensors (LoRA + heads), optimizer, scheduler,
per-rank RNG states, the step (which fixes the data position: epoch = step // batches_per_epoch)
and the validation bookkeeping. It is written to a temporary folder and renamed, so a kill while
saving leaves the previous checkpoint intact. Under DeepSpeed, the engine's own (partitioned)
checkpoint is used for model and optimizer.
"""
from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from clipit import layout
from clipit.io import atomic_write_json, read_json, replace_dir
from clipit.training.accel import uses_deepspeed


def latest_dir(run_dir: str | Path) -> Path:
    return layout.resume_dir(run_dir)


def rng_state(generator: torch.Generator) -> dict:
    return {"torch": torch.get_rng_state(), "generator": generator.get_state(), "numpy": np.random.get_state(),
            "python": random.getstate()}


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save_training_state(run_dir: str | Path, accelerator: Accelerator, model, optimizer, scheduler,
                        generator: torch.Generator, progress: dict) -> Path:
    final = latest_dir(run_dir)
    tmp = final.parent / f".latest.tmp-{progress['step']}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if uses_deepspeed(accelerator):
        model.save_checkpoint(str(tmp / "deepspeed"), tag="state", exclude_frozen_parameters=True)
    elif accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        trainable = {n: p.detach().cpu().contiguous() for n, p in unwrapped.named_parameters() if p.requires_grad}
        save_file(trainable, str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(rng_state(generator), tmp / f"rng-{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        atomic_write_json(tmp / "progress.json", progress)
        replace_dir(tmp, final)
    accelerator.wait_for_everyone()
    return final


def load_training_state(run_dir: str | Path, accelerator: Accelerator, model, optimizer, scheduler,
                        generator: torch.Generator) -> dict | None:
    """Restore the latest checkpoint in place; returns its progress dict, or None if there is none."""
    path = latest_dir(run_dir)
    if not (path / "progress.json").exists():
        return None
    if uses_deepspeed(accelerator):
        # frozen parameters were excluded on save (they come from the weights file / warm start), so the
        # module load is partial by design; the optimizer state covers exactly the trainable tensors
        model.load_checkpoint(str(path / "deepspeed"), tag="state", load_module_strict=False)
    else:
        unwrapped = accelerator.unwrap_model(model)
        saved = load_file(str(path / "trainable.safetensors"))
        own = dict(unwrapped.named_parameters())
        wrong = [k for k, v in saved.items() if k not in own or own[k].shape != v.shape]
        if wrong or set(saved) != {n for n, p in own.items() if p.requires_grad}:
            raise ValueError(f"{path}: checkpoint does not match this model ({wrong[:3]}); "
                             "the config changed since it was written — use a new output_dir")
        with torch.no_grad():
            for name, value in saved.items():
                own[name].copy_(value)
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    rng_file = path / f"rng-{accelerator.process_index}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=False), generator)
    return read_json(path / "progress.json")
