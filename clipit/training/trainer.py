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
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from clipit.config import ExperimentConfig, TrainConfig, dump_config
from clipit.io import atomic_write_json, read_json
from clipit.metrics import classification_metrics
from clipit.models.clipit import clipit_loss
from clipit.shards import load_manifest, split_urls
from clipit.training.accel import make_accelerator
from clipit.training.checkpoint import load_model_state, save_model
from clipit.training.loader import DevicePreprocess, eval_loader, train_loader
from clipit.training.signals import GracefulStop
from clipit.training.state import load_training_state, save_training_state
from clipit.training.text_side import TextInputs, attach_text_tower, cached_text

def build_model(cfg: ExperimentConfig, tcfg: TrainConfig, num_classes: int, text_dim: int,
                warm_start: Path | None = None, text_tower: bool = True):
    """The method's model (backbone weights resolved and loaded, warm start copied in, LoRA/frozen/full
    fine-tuning set up) and the device preprocessing for its backbone. `text_tower=False` leaves out a
    trainable text tower (text_encoder: tower): evaluation and export run the vision model only.

    Backbone weights found through the weights file or the hub are written back to cfg.model.weights,
    so the run's config.yaml records exactly which checkpoint was used (and rebuilds use it again).
    """
    from clipit.config import ConfigError
    from clipit.models.clipit import prepare_finetune, resolve_finetune
    from clipit.models.factory import build_method_model

    model, spec, source = build_method_model(cfg.model, tcfg, num_classes, text_dim)
    if source is not None and source.kind != "random":
        cfg.model.weights = source.stored
    if warm_start is not None:  # CLIP-IT starts from the unimodal probe's backbone and head
        load_model_state(warm_start, model, prefixes=model.warm_start_prefixes)
    if tcfg.text_warm_start:  # late fusion: H_t from the text model of the same seed
        if not tcfg.warm_start:
            raise ConfigError(f"methods.*.text_warm_start={tcfg.text_warm_start!r} needs warm_start too "
                              "(the text run is found next to the warm-start run of the same seed)")
        if warm_start is not None:  # training; evaluation reloads H_t from the run's own checkpoint
            text_best = Path(warm_start).parent.parent.parent / tcfg.text_warm_start / Path(warm_start).parent.name / "best"
            if not text_best.with_suffix(".json").exists():
                raise ConfigError(f"{text_best}.json: text warm start is missing; train {tcfg.text_warm_start} first")
            load_model_state(text_best, model, prefixes=("text_head.",))
    if text_tower:
        attach_text_tower(model, cfg, tcfg, text_dim)
    finetune = resolve_finetune(tcfg.method, tcfg.finetune, cfg.model.lora.enabled)
    prepare_finetune(model, finetune, cfg.model.lora, warm_head=tcfg.warm_start is not None)
    preprocess = DevicePreprocess(cfg.model.image_size or spec.input_size, spec.mean, spec.std)
    return model, preprocess


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


@torch.no_grad()
def predict(model, preprocess, loader, accelerator: Accelerator, lam: float,
            text_inputs: TextInputs | None = None) -> dict:
    """Logits, labels and keys of every sample (gathered over ranks) and the mean loss terms.

    The bare module runs, not the DDP/DeepSpeed wrapper: ranks hold different numbers of eval batches
    (none at all with fewer shards than ranks), and DDP's forward broadcasts buffers (the text tower
    has some), a collective that a rank without batches would never join."""
    wrapper, model = model, accelerator.unwrap_model(model) if hasattr(model, "module") else model  # DDP / DeepSpeed
    wrapper.eval()
    logits, labels, keys, terms = [], [], [], []
    for batch in loader:
        images = preprocess(batch["images"].to(accelerator.device))
        inputs = (text_inputs or cached_text)(batch, accelerator.device)
        with accelerator.autocast():
            out = model(images, **inputs)
        target = batch["labels"].to(accelerator.device)
        losses = clipit_loss(out, target, inputs["text_emb"], lam)
        n = len(target)
        terms.append({k: float(v) * n for k, v in losses.items()} | {"n": n})
        logits.append(out["logits"].float().cpu().numpy())
        labels.append(batch["labels"].numpy())
        keys += batch["keys"]
    wrapper.train()
    parts = gather_object([(np.concatenate(logits) if logits else np.zeros((0, 0)),
                            np.concatenate(labels) if labels else np.zeros(0, np.int64), keys, terms)])
    logits = np.concatenate([p[0] for p in parts if len(p[1])])
    labels = np.concatenate([p[1] for p in parts if len(p[1])])
    keys = [k for p in parts for k in p[2]]
    terms = [t for p in parts for t in p[3]]
    total = sum(t["n"] for t in terms)
    loss_terms = {k: sum(t[k] for t in terms if k in t) / total for k in terms[0] if k != "n"}
    order = np.argsort(keys, kind="stable")  # rank order differs between world sizes; keys do not
    return {"logits": logits[order], "labels": labels[order], "keys": [keys[i] for i in order], **loss_terms}


def fit(cfg: ExperimentConfig, method: str, seed: int, run_dir: str | Path, warm_start: Path | None = None) -> dict:
    """Train one cell (resuming from its latest checkpoint); returns the summary. Finished runs are skipped."""
    run_dir = Path(run_dir)
    summary_path = run_dir / "train_summary.json"
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
    batches_per_epoch = max(1, manifest["splits"]["train"]["count"] // (tcfg.batch_size * world))
    total_steps = max(1, round(tcfg.epochs * batches_per_epoch))
    eval_every = max(1, batches_per_epoch // tcfg.evals_per_epoch)
    checkpoint_every = tcfg.checkpoint_every or eval_every
    optimizer = make_optimizer(tcfg, params)
    scheduler = make_scheduler(tcfg, optimizer, total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    params = [p for p in model.parameters() if p.requires_grad]
    preprocess = preprocess.to(accelerator.device)
    # augmentation and word drop: each rank its own draws; rank 0 keeps the seed (1-process runs unchanged)
    generator = torch.Generator().manual_seed(seed + 1_000_003 * accelerator.process_index)
    text_inputs = TextInputs(accelerator.unwrap_model(model), tcfg, cfg.shards.dir, manifest, accelerator.device)
    progress = load_training_state(run_dir, accelerator, model, optimizer, scheduler, generator)
    resumed_from = progress["step"] if progress else None
    if progress and progress["batches_per_epoch"] != batches_per_epoch:
        raise ValueError(f"{run_dir}: checkpoint was written with {progress['batches_per_epoch']} batches/epoch, "
                         f"this launch gives {batches_per_epoch}; resume with the same world size and batch size")
    progress = progress or {"step": 0, "best_score": None, "best_step": 0, "batches_per_epoch": batches_per_epoch}
    step = progress["step"]
    epoch, skip = divmod(step, batches_per_epoch)
    train_batches = train_loader(split_urls(cfg.shards.dir, "train", manifest), tcfg.batch_size, batches_per_epoch,
                                 seed=seed, num_workers=tcfg.num_workers, load_size=preprocess.size, start_epoch=epoch)
    val_batches = eval_loader(split_urls(cfg.shards.dir, "val", manifest), 2 * tcfg.batch_size,
                              accelerator.process_index, world, tcfg.num_workers, preprocess.size)
    main = accelerator.is_main_process
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run_dir / "config.yaml")
    writer = SummaryWriter(str(run_dir / "tb")) if main else None
    meta = {"method": method, "seed": seed, "classes": classes, "backbone": cfg.model.backbone,
            "weights": cfg.model.weights, "text_dim": manifest["embedding"]["dim"], "train": vars(tcfg).copy(),
            "lora": vars(cfg.model.lora).copy(), "kd_layers": cfg.model.kd_layers, "image_size": preprocess.size}

    def save_best():  # reads the current step
        save_model(run_dir / "best", accelerator.unwrap_model(model), meta | {"step": step},
                   full=cfg.model.weights in (None, "random"))

    start = time.time()
    waited, window_start, window_images = 0.0, time.time(), 0
    bar = tqdm(total=total_steps, initial=step, desc=f"{method} seed {seed}", unit="step", disable=not main)
    stop = GracefulStop()
    model.train()
    try:
        while step < total_steps:
            batches = islice(iter(train_batches), skip, batches_per_epoch)  # exactly one epoch; skip = resume offset
            skip = 0
            fetch_start = time.time()
            for batch in batches:
                waited += time.time() - fetch_start
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
                window_images += len(images) * world
                bar.update(1)
                if writer and (step % 10 == 0 or step == total_steps):
                    elapsed = time.time() - window_start
                    for name, value in losses.items():
                        writer.add_scalar(f"train/{name}", float(value.detach()), step)
                    writer.add_scalar("train/lr", scheduler.get_last_lr()[0], step)
                    writer.add_scalar("perf/images_per_s", window_images / max(elapsed, 1e-9), step)
                    writer.add_scalar("perf/data_wait_pct", 100 * waited / max(elapsed, 1e-9), step)
                    waited, window_start, window_images = 0.0, time.time(), 0
                if step % eval_every == 0 or step == total_steps:
                    validate(model, preprocess, val_batches, text_inputs, accelerator, tcfg, classes, step, writer,
                             progress, save_best)
                progress["step"] = step
                stopping = stop.requested(accelerator.device)
                if step < total_steps and (step % checkpoint_every == 0 or stopping):
                    if writer:
                        writer.flush()
                    save_training_state(run_dir, accelerator, model, optimizer, scheduler, generator, progress)
                if stopping:
                    stop.finish()
                if step >= total_steps:
                    break
                fetch_start = time.time()
    finally:
        stop.restore()
        bar.close()
    summary = {"steps": total_steps, "best_step": progress["best_step"], "select": tcfg.select, "world_size": world,
               "batches_per_epoch": batches_per_epoch, "resumed_from_step": resumed_from,
               "wall_s": round(time.time() - start, 2)}
    if writer:
        writer.close()
        atomic_write_json(summary_path, summary)
    accelerator.wait_for_everyone()
    return summary


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
