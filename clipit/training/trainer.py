"""The training loop on Accelerate: one code path for 1 CPU process, torchrun/accelerate launch and srun.

`fit` trains one (method, seed) cell from the shards and leaves in its run directory:
    best.safetensors / best.json   the checkpoint selected on validation
    tb/                            TensorBoard scalars (loss terms, lr, val metrics, images/s, data wait %)
    checkpoints/latest/            resume state (see state.py); a rerun continues from it
    train_summary.json             steps, best step, wall time (its presence marks the run as trained)
SIGTERM/SIGUSR2 save a resume checkpoint at the next step boundary, then stop (or requeue under submitit).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import torch
from accelerate.utils import set_seed
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from clipit import layout
from clipit.config import ExperimentConfig, TrainConfig, dump_config
from clipit.io import atomic_write_json, read_json
from clipit.metrics import classification_metrics
from clipit.models.checkpoint import save_model
from clipit.models.clipit import clipit_loss
from clipit.models.factory import build_model
from clipit.shards.format import load_manifest, split_urls
from clipit.training.accel import make_accelerator
from clipit.training.loader import eval_loader, train_loader
from clipit.training.predict import predict
from clipit.training.signals import GracefulStop
from clipit.training.state import load_training_state, save_training_state
from clipit.training.text_side import TextInputs


@dataclass(frozen=True)
class StepPlan:
    """How long a run is and when it validates and checkpoints, in optimizer steps."""

    batches_per_epoch: int  # per rank; a resume checkpoint is only valid for the same value
    total_steps: int
    eval_every: int
    checkpoint_every: int


def step_plan(manifest: dict, tcfg: TrainConfig, world: int) -> StepPlan:
    """The step plan for the train split of `manifest` over `world` processes of `tcfg.batch_size` each."""
    batches_per_epoch = max(1, manifest["splits"]["train"]["count"] // (tcfg.batch_size * world))
    eval_every = max(1, batches_per_epoch // tcfg.evals_per_epoch)
    return StepPlan(batches_per_epoch=batches_per_epoch, total_steps=max(1, round(tcfg.epochs * batches_per_epoch)),
                    eval_every=eval_every, checkpoint_every=tcfg.checkpoint_every or eval_every)


def make_optimizer(tcfg: TrainConfig, params) -> torch.optim.Optimizer:
    if tcfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=tcfg.lr, momentum=tcfg.momentum, weight_decay=tcfg.weight_decay, nesterov=True)
    cls = torch.optim.AdamW if tcfg.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay)


def make_scheduler(tcfg: TrainConfig, optimizer, total_steps: int):
    if tcfg.schedule == "none":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    floor = tcfg.min_lr / tcfg.lr if tcfg.lr else 0.0
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps)))


def fit(cfg: ExperimentConfig, method: str, seed: int, run_dir: str | Path, warm_start: Path | None = None) -> dict:
    """Train one cell (resuming from its latest checkpoint); returns the summary. Finished runs are skipped."""
    run_dir = Path(run_dir)
    summary_path = layout.train_summary(run_dir)
    if summary_path.exists():
        return read_json(summary_path)
    tcfg = cfg.methods[method]
    accelerator = make_accelerator(tcfg)
    set_seed(seed)
    manifest = load_manifest(cfg.shards.dir)
    classes = manifest["classes"]
    model, preprocess = build_model(cfg, tcfg, len(classes), manifest["embedding"]["dim"], warm_start)
    params = [p for p in model.parameters() if p.requires_grad]
    world = accelerator.num_processes
    plan = step_plan(manifest, tcfg, world)
    optimizer = make_optimizer(tcfg, params)
    scheduler = make_scheduler(tcfg, optimizer, plan.total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    params = [p for p in model.parameters() if p.requires_grad]
    preprocess = preprocess.to(accelerator.device)
    # augmentation and word drop: each rank its own draws; rank 0 keeps the seed (1-process runs unchanged)
    generator = torch.Generator().manual_seed(seed + 1_000_003 * accelerator.process_index)
    text_inputs = TextInputs(accelerator.unwrap_model(model), tcfg, cfg.shards.dir, manifest, accelerator.device)
    progress = load_training_state(run_dir, accelerator, model, optimizer, scheduler, generator)
    resumed_from = progress["step"] if progress else None
    if progress and progress["batches_per_epoch"] != plan.batches_per_epoch:
        raise ValueError(f"{run_dir}: checkpoint was written with {progress['batches_per_epoch']} batches/epoch, "
                         f"this launch gives {plan.batches_per_epoch}; resume with the same world size and batch size")
    progress = progress or {"step": 0, "best_score": None, "best_step": 0, "batches_per_epoch": plan.batches_per_epoch}
    step = progress["step"]
    epoch, skip = divmod(step, plan.batches_per_epoch)
    train_batches = train_loader(split_urls(cfg.shards.dir, "train", manifest), tcfg.batch_size,
                                 plan.batches_per_epoch, seed=seed, num_workers=tcfg.num_workers,
                                 load_size=preprocess.size, start_epoch=epoch)
    val_batches = eval_loader(split_urls(cfg.shards.dir, "val", manifest), 2 * tcfg.batch_size,
                              accelerator.process_index, world, tcfg.num_workers, preprocess.size)
    main = accelerator.is_main_process
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, layout.config_file(run_dir))
    writer = SummaryWriter(str(layout.tensorboard_dir(run_dir))) if main else None
    meta = {"method": method, "seed": seed, "classes": classes, "backbone": cfg.model.backbone,
            "weights": cfg.model.weights, "text_dim": manifest["embedding"]["dim"], "train": vars(tcfg).copy(),
            "lora": vars(cfg.model.lora).copy(), "kd_layers": cfg.model.kd_layers, "image_size": preprocess.size}

    def save_best():  # reads the current step
        save_model(layout.best(run_dir), accelerator.unwrap_model(model), meta | {"step": step},
                   full=cfg.model.weights in (None, "random"))

    start = time.time()
    window = _Window()
    bar = tqdm(total=plan.total_steps, initial=step, desc=f"{method} seed {seed}", unit="step", disable=not main)
    stop = GracefulStop()
    model.train()
    try:
        while step < plan.total_steps:
            batches = islice(iter(train_batches), skip, plan.batches_per_epoch)  # one epoch; skip = resume offset
            skip = 0
            fetch_start = time.time()
            for batch in batches:
                window.waited += time.time() - fetch_start
                images = preprocess(batch["images"].to(accelerator.device), augment=tcfg.augment, generator=generator)
                inputs = text_inputs(batch, accelerator.device, train=True, generator=generator)
                with accelerator.autocast():
                    out = model(images, **inputs)
                losses = clipit_loss(out, batch["labels"].to(accelerator.device), inputs["text_emb"], tcfg.lam)
                accelerator.backward(losses["loss"])
                if tcfg.grad_clip and accelerator.state.deepspeed_plugin is None:  # DeepSpeed clips itself
                    accelerator.clip_grad_norm_(params, tcfg.grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                window.images += len(images) * world
                bar.update(1)
                if writer and (step % 10 == 0 or step == plan.total_steps):
                    window = _log_train_step(writer, step, losses, scheduler, window)
                if step % plan.eval_every == 0 or step == plan.total_steps:
                    validate(model, preprocess, val_batches, text_inputs, accelerator, tcfg, classes, step, writer,
                             progress, save_best)
                progress["step"] = step
                stopping = stop.requested(accelerator.device)
                if step < plan.total_steps and (step % plan.checkpoint_every == 0 or stopping):
                    if writer:
                        writer.flush()
                    save_training_state(run_dir, accelerator, model, optimizer, scheduler, generator, progress)
                if stopping:
                    stop.finish()
                if step >= plan.total_steps:
                    break
                fetch_start = time.time()
    finally:
        stop.restore()
        bar.close()
    summary = {"steps": plan.total_steps, "best_step": progress["best_step"], "select": tcfg.select,
               "world_size": world, "batches_per_epoch": plan.batches_per_epoch, "resumed_from_step": resumed_from,
               "wall_s": round(time.time() - start, 2)}
    if writer:
        writer.close()
        atomic_write_json(summary_path, summary)
    accelerator.wait_for_everyone()
    return summary


@dataclass
class _Window:
    """Data wait and images seen since the last train/ scalars: perf/ reports the window, not the run."""

    waited: float = 0.0
    images: int = 0
    start: float = field(default_factory=lambda: time.time())


def _log_train_step(writer, step: int, losses: dict, scheduler, window: _Window) -> _Window:
    """Loss terms, lr, images/s and data wait % of the window; returns a fresh window."""
    elapsed = time.time() - window.start
    for name, value in losses.items():
        writer.add_scalar(f"train/{name}", float(value.detach()), step)
    writer.add_scalar("train/lr", scheduler.get_last_lr()[0], step)
    writer.add_scalar("perf/images_per_s", window.images / max(elapsed, 1e-9), step)
    writer.add_scalar("perf/data_wait_pct", 100 * window.waited / max(elapsed, 1e-9), step)
    return _Window()


def validate(model, preprocess, val_batches, text_inputs: TextInputs, accelerator, tcfg: TrainConfig, classes,
             step: int, writer, progress: dict, save_best) -> None:
    """Evaluate on val, log, and keep the best checkpoint by the configured criterion."""
    val = predict(model, preprocess, val_batches, accelerator, tcfg.lam, text_inputs)
    metrics = classification_metrics(val["labels"], val["logits"], classes)
    score = {"val_loss": -val["loss"], "val_bacc": metrics["balanced_accuracy"], "last": step}[tcfg.select]
    if writer:
        writer.add_scalar("val/loss", val["loss"], step)
        writer.add_scalar("val/accuracy", metrics["accuracy"], step)
        writer.add_scalar("val/balanced_accuracy", metrics["balanced_accuracy"], step)
    if progress["best_score"] is None or score > progress["best_score"]:
        progress["best_score"], progress["best_step"] = score, step
        if accelerator.is_main_process:
            save_best()
    accelerator.wait_for_everyone()
