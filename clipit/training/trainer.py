"""The training loop on Accelerate: one code path for 1 CPU process, torchrun/accelerate launch and srun.

`fit` trains one (method, seed) cell from the shards and leaves in its run directory:
    best.safetensors / best.json   the checkpoint selected on validation
    train.log                      plain progress lines, appended (clipit/training/logs.py)
    checkpoints/latest/            resume state (see state.py); a rerun continues from it
    train_summary.json             steps, best step, wall time (its presence marks the run as trained)
and its TensorBoard scalars + HParams in <output_dir>/tb/<method>/seed-<n> (clipit/training/tb.py).
SIGTERM/SIGUSR2 save a resume checkpoint at the next step boundary, then stop (or requeue under submitit).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import torch
from accelerate.utils import set_seed

from clipit import layout
from clipit.config import ExperimentConfig, TrainConfig, dump_config
from clipit.errors import ClipitError
from clipit.io import atomic_write_json, read_json, sha256_file
from clipit.metrics import classification_metrics
from clipit.models.checkpoint import save_model
from clipit.models.clipit import clipit_loss, param_groups
from clipit.models.factory import build_model
from clipit.models.speed import apply_speed_settings
from clipit.shards.manifest import ShardError, load_manifest
from clipit.shards.validate import verify_shard_set
from clipit.training.accel import claim_deepspeed_run, main_process_lock, make_accelerator, raise_together
from clipit.training.features import backbone_forwards_so_far
from clipit.training.imported import import_probe_head
from clipit.training.loader import eval_loader, train_loader
from clipit.training.logs import TrainLog
from clipit.training.predict import NonFiniteError, ShardSource, predict, samples
from clipit.training.probe import cached_inputs
from clipit.training.run_files import checkpoint_meta
from clipit.training.signals import GracefulStop
from clipit.training.state import ResumeError, load_training_state, save_training_state
from clipit.training.tb import open_writer, run_hparams, write_hparams
from clipit.training.text_side import TextInputs
from clipit.training.zero_shot import save_zero_shot


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
    return StepPlan(
        batches_per_epoch=batches_per_epoch,
        total_steps=max(1, round(tcfg.epochs * batches_per_epoch)),
        eval_every=eval_every,
        checkpoint_every=tcfg.checkpoint_every or eval_every,
    )


def make_optimizer(tcfg: TrainConfig, params) -> torch.optim.Optimizer:
    if tcfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=tcfg.lr, momentum=tcfg.momentum, weight_decay=tcfg.weight_decay, nesterov=True
        )
    cls = torch.optim.AdamW if tcfg.optimizer == "adamw" else torch.optim.Adam
    groups = list(params)
    tensors = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    return cls(groups, lr=tcfg.lr, weight_decay=tcfg.weight_decay, fused=use_fused(tensors) or None)


def use_fused(params) -> bool:
    """Fused Adam/AdamW (one kernel for all parameters) when every parameter is a float tensor on CUDA;
    elsewhere torch's default (foreach on CPU)."""
    params = list(params)
    return bool(params) and all(p.device.type == "cuda" and p.is_floating_point() for p in params)


def make_scheduler(tcfg: TrainConfig, optimizer, total_steps: int):
    if tcfg.schedule == "none":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    floor = tcfg.min_lr / tcfg.lr if tcfg.lr else 0.0
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps)),
    )


def run_identity(
    cfg: ExperimentConfig, method: str, seed: int, manifest: dict, world: int, warm_start: Path | None
) -> dict:
    """What a run's trajectory depends on, keyed as the config spells it: a resume checkpoint is only
    continued by a launch with the same identity (checkpoint_every and log_every change no result: left out)."""
    tcfg, mcfg = cfg.methods[method], cfg.model
    shards = hashlib.sha256(
        json.dumps({k: manifest.get(k) for k in ("splits", "embedding", "texts", "classes")}, sort_keys=True).encode()
    ).hexdigest()
    identity = {
        "methods": {method: {k: v for k, v in vars(tcfg).items() if k not in ("checkpoint_every", "log_every")}},
        "model": {
            "backbone": mcfg.backbone,
            "weights": mcfg.weights,
            "image_size": mcfg.image_size,
            "lora": vars(mcfg.lora).copy(),
            "kd_layers": mcfg.kd_layers,
        },
        "seed": seed,
        "processes": world,
        "shards": {"manifest_sha256": shards},
    }
    if tcfg.text_encoder == "tower":
        identity["pairing"] = {"model": cfg.pairing.model, "checkpoint": cfg.pairing.checkpoint}
    if warm_start is not None and Path(warm_start).with_suffix(".safetensors").exists():
        identity["warm_start"] = {"sha256": sha256_file(Path(warm_start).with_suffix(".safetensors"))}
    return json.loads(json.dumps(identity, default=str))


def fit(cfg: ExperimentConfig, method: str, seed: int, run_dir: str | Path, warm_start: Path | None = None) -> dict:
    """Train one cell (resuming from its latest checkpoint); returns the summary. Finished runs are skipped.

    Rank 0 holds the run directory's lock (clipit.locks) throughout: a second launch on the same cell
    stops with one line instead of writing the same files."""
    run_dir = Path(run_dir)
    summary_path = layout.train_summary(run_dir)
    if summary_path.exists():
        return read_json(summary_path)
    accelerator = make_accelerator(cfg.methods[method])
    with main_process_lock(accelerator, run_dir, "run directory"):
        if summary_path.exists():  # finished by the previous holder of the lock
            return read_json(summary_path)
        return _fit(cfg, method, seed, run_dir, warm_start, accelerator)


def verified_manifest(accelerator, shard_dir: str | Path) -> dict:
    """The shard set's manifest, once rank 0 has checked the set against it (every tar present, counts,
    sha256; clipit/shards/validate.py caches the hashes per unchanged tar). All ranks stop together."""
    manifest = load_manifest(shard_dir)
    error = None
    if accelerator.is_main_process:
        try:
            verify_shard_set(shard_dir, manifest)
        except ClipitError as err:
            error = err
    raise_together(
        accelerator, error, ShardError(f"{shard_dir}: rank 0 found the shard set damaged (see its error line)")
    )
    return manifest


def _fit(cfg: ExperimentConfig, method: str, seed: int, run_dir: Path, warm_start: Path | None, accelerator) -> dict:
    summary_path = layout.train_summary(run_dir)
    tcfg = cfg.methods[method]
    forwards_before = backbone_forwards_so_far()
    set_seed(seed)
    manifest = verified_manifest(accelerator, cfg.shards.dir)
    classes = manifest["classes"]
    model, preprocess = build_model(cfg, tcfg, len(classes), manifest["embedding"]["dim"], warm_start)
    if tcfg.method == "zero_shot":  # nothing trains: the prompt-ensemble classifier is saved as it is built
        return save_zero_shot(cfg, method, seed, run_dir, model, preprocess, manifest, accelerator)
    if tcfg.head_from:  # an existing probe (e.g. kaiko eva's) instead of training one
        return import_probe_head(cfg, method, seed, run_dir, model, preprocess, manifest, accelerator)
    apply_speed_settings(model, cfg.model)  # gradient checkpointing, torch.compile: training only
    model.to(accelerator.device)  # before the optimizer, which is fused when its parameters are on a GPU
    groups = param_groups(model, tcfg.lr, tcfg.pretrained_lr, warm_head=tcfg.warm_start is not None)
    world = accelerator.num_processes
    if accelerator.is_main_process:  # what actually runs, once, before the first step
        backend = accelerator.state.backend or "none"
        print(
            f"[clipit train] {method} seed {seed}: world size {world}, backend {backend}, device "
            f"{accelerator.device}, precision {tcfg.precision}, distributed {tcfg.distributed}",
            flush=True,
        )
    plan = step_plan(manifest, tcfg, world)
    optimizer = make_optimizer(tcfg, groups)
    scheduler = make_scheduler(tcfg, optimizer, plan.total_steps)
    # a frozen backbone on unaugmented images: its features once (shared by seeds), then only what follows it
    cached = cached_inputs(cfg, method, accelerator, manifest, model, preprocess)
    if cached:
        model, preprocess = cached.model, cached.preprocess
    claim_deepspeed_run(accelerator, str(run_dir))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    params = [p for p in model.parameters() if p.requires_grad]
    preprocess = preprocess.to(accelerator.device)
    # augmentation and word drop: each rank its own draws; rank 0 keeps the seed (1-process runs unchanged)
    generator = torch.Generator().manual_seed(seed + 1_000_003 * accelerator.process_index)
    text_inputs = TextInputs(accelerator.unwrap_model(model), tcfg, cfg.shards.dir, manifest, accelerator.device)
    identity = run_identity(cfg, method, seed, manifest, world, warm_start)
    restart = f"clipit train --config <config> --method {method} --seed {seed} --resume none"
    progress = load_training_state(
        run_dir, accelerator, model, optimizer, scheduler, generator, identity, fix=f"start over with `{restart}`"
    )
    resumed_from = progress["step"] if progress else None
    if progress and progress["batches_per_epoch"] != plan.batches_per_epoch:
        raise ResumeError(
            f"{layout.resume_dir(run_dir)}: checkpoint was written with {progress['batches_per_epoch']} "
            f"batches/epoch, this launch gives {plan.batches_per_epoch}; resume with the same world size "
            f"and batch size, or start over with `{restart}`"
        )
    progress = progress or {"step": 0, "best_score": None, "best_step": 0, "batches_per_epoch": plan.batches_per_epoch}
    progress["identity"] = identity
    step = progress["step"]
    epoch, skip = divmod(step, plan.batches_per_epoch)
    train_source = ShardSource(Path(cfg.shards.dir), "train", manifest)
    val_source = ShardSource(Path(cfg.shards.dir), "val", manifest)
    if cached:  # the same batches as the loaders below would give, from the cached features
        train_batches = cached.train_batches(tcfg.batch_size, plan.batches_per_epoch, seed, tcfg.num_workers, epoch)
        val_batches = cached.val_batches(2 * tcfg.batch_size, accelerator.process_index, world)
    else:
        train_batches = train_loader(
            train_source.urls,
            tcfg.batch_size,
            plan.batches_per_epoch,
            seed=seed,
            num_workers=tcfg.num_workers,
            load_size=preprocess.size,
            start_epoch=epoch,
        )
        val_batches = eval_loader(
            val_source.urls, 2 * tcfg.batch_size, accelerator.process_index, world, tcfg.num_workers, preprocess.size
        )
    main = accelerator.is_main_process
    writer = None
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, layout.config_file(run_dir))
        writer = open_writer(run_dir, resumed_from)
        if resumed_from is None:
            write_hparams(writer, run_hparams(cfg, method, seed, world))
    meta = checkpoint_meta(cfg, method, seed, manifest, preprocess.size)
    hint = f"lower methods.{method}.lr (or fix methods.{method}.lam / the shards), then start over with `{restart}`"

    def check_weights(what: str):  # nothing non-finite is ever saved (best checkpoint or resume state)
        bad = [
            n
            for n, p in accelerator.unwrap_model(model).named_parameters()
            if p.requires_grad and not torch.isfinite(p.detach()).all()
        ]
        if bad:
            raise NonFiniteError(
                f"training step {step} of {method} seed {seed}: non-finite weights in {len(bad)} "
                f"tensors (e.g. {bad[0]}) before {what}; {hint}"
            )

    def save_best():  # reads the current step; every rank has run check_weights before
        save_model(
            layout.best(run_dir),
            accelerator.unwrap_model(model),
            meta | {"step": step},
            full=cfg.model.weights in (None, "random"),
        )

    start = time.time()
    window = _Window()
    log = TrainLog(
        run_dir, f"{method} seed {seed}", plan.total_steps, plan.batches_per_epoch, tcfg.log_every, step, main
    )
    log.start(resumed_from, world, plan.eval_every)
    stop = GracefulStop()
    stopped_early = None  # step at which `patience` validations without improvement ended the run
    model.train()
    try:
        while step < plan.total_steps and stopped_early is None:
            batches = islice(iter(train_batches), skip, plan.batches_per_epoch)  # one epoch; skip = resume offset
            skip = 0
            fetch_start = time.time()
            for batch in train_source.batches(batches, f"training of {method} seed {seed}"):
                waited = time.time() - fetch_start
                window.waited += waited
                images = preprocess(
                    batch["images"].to(accelerator.device, non_blocking=True), augment=tcfg.augment, generator=generator
                )
                inputs = text_inputs(batch, accelerator.device, train=True, generator=generator)
                with accelerator.autocast():
                    out = model(images, **inputs)
                losses = clipit_loss(
                    out, batch["labels"].to(accelerator.device, non_blocking=True), inputs["text_emb"], tcfg.lam
                )
                local_bad = ~torch.isfinite(losses["loss"].detach())
                # one collective per step: a stop signal or a non-finite loss on any rank stops every rank here
                stopping, nonfinite = stop.poll(accelerator.device, local_bad)
                if nonfinite:  # before backward: under DeepSpeed backward also steps the optimizer
                    raise NonFiniteError(
                        _nonfinite_loss(
                            step + 1, method, seed, losses, batch, out, inputs, bool(local_bad), train_source, hint
                        )
                    )
                accelerator.backward(losses["loss"])
                if tcfg.grad_clip and accelerator.state.deepspeed_plugin is None:  # DeepSpeed clips itself
                    norm = accelerator.clip_grad_norm_(params, tcfg.grad_clip)
                    if norm is not None and not torch.isfinite(torch.as_tensor(norm)).all():
                        # gradients are all-reduced, so every rank sees the same norm and stops here
                        raise NonFiniteError(
                            f"training step {step + 1} of {method} seed {seed}: the gradient norm "
                            f"is {float(norm)} (batch {train_source.describe(batch['keys'])}); {hint}"
                        )
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                window.images += len(images) * world
                log.step(step, losses["loss"], scheduler.get_last_lr()[0], len(images) * world, waited)
                if writer and (step % 10 == 0 or step == plan.total_steps):
                    window = _log_train_step(writer, step, losses, scheduler, window)
                if step % plan.eval_every == 0 or step == plan.total_steps:
                    val = validate(
                        model,
                        preprocess,
                        val_batches,
                        text_inputs,
                        accelerator,
                        tcfg,
                        classes,
                        step,
                        writer,
                        progress,
                        save_best,
                        source=val_source,
                        what=f"validation at step {step} of {method} seed {seed}",
                        hint=hint,
                        check_weights=check_weights,
                    )
                    log.validation(step, val, progress["best_score"], progress["best_step"], tcfg.select)
                    if tcfg.patience and step - progress["best_step"] >= tcfg.patience * plan.eval_every:
                        stopped_early = step  # the same on every rank: validation metrics are global
                progress["step"] = step
                if stopped_early is not None:
                    break
                if step < plan.total_steps and (step % plan.checkpoint_every == 0 or stopping):
                    check_weights("saving a resume checkpoint")
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
        log.close()
        if writer:
            writer.close()
    summary = {
        "steps": plan.total_steps,
        "best_step": progress["best_step"],
        "select": tcfg.select,
        "world_size": world,
        "batches_per_epoch": plan.batches_per_epoch,
        "resumed_from_step": resumed_from,
        "stopped_early_at_step": stopped_early,
        "best_val": progress.get("best_val"),  # val metrics of the selected checkpoint (LoRA search)
        # images this process ran through the backbone (a feature-cache build included)
        "backbone_forwards": backbone_forwards_so_far() - forwards_before,
        "wall_s": round(time.time() - start, 2),
        **({"feature_cache": str(cached.cache_dir)} if cached else {}),
    }
    if main:
        atomic_write_json(summary_path, summary)
    log.finish(summary)
    accelerator.wait_for_everyone()
    return summary


def _nonfinite_loss(
    step: int,
    method: str,
    seed: int,
    losses: dict,
    batch: dict,
    out: dict,
    inputs: dict,
    local: bool,
    source: ShardSource,
    hint: str,
) -> str:
    """The one-line reason a training step stopped: which term is not finite, and the samples behind it."""
    where = f"training step {step} of {method} seed {seed}"
    if not local:
        return f"{where}: the loss is not finite on another rank (its error line names the batch); {hint}"
    terms = ", ".join(f"{k} {float(v.detach())}" for k, v in losses.items() if not torch.isfinite(v.detach()))
    keys = list(dict.fromkeys(batch["keys"]))  # resampling can draw a sample twice into one batch
    text = inputs.get("text_emb")
    bad_text = (~torch.isfinite(text.float()).all(dim=1)).cpu().tolist() if text is not None and text.numel() else []
    if any(bad_text):
        named = list(dict.fromkeys(k for k, bad in zip(batch["keys"], bad_text) if bad))
        return (
            f"{where}: the loss is not finite ({terms}) because {samples(len(named))} non-finite report "
            f"embeddings: {source.describe(named)}; check the shards with `clipit shard validate "
            f"{source.shard_dir}` and rebuild the damaged ones"
        )
    rows = (~torch.isfinite(out["logits"].detach().float()).all(dim=1)).cpu().tolist()
    named = list(dict.fromkeys(k for k, bad in zip(batch["keys"], rows) if bad))
    if named and len(named) == len(keys):
        culprit = f"non-finite logits for all {len(keys)} samples of the batch: the weights diverged"
    elif named:
        culprit = f"non-finite logits for {len(named)} samples: {source.describe(named)}"
    else:
        culprit = f"batch {source.describe(keys)}"
    return f"{where}: the loss is not finite ({terms}; {culprit}); {hint}"


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


def validate(
    model,
    preprocess,
    val_batches,
    text_inputs: TextInputs,
    accelerator,
    tcfg: TrainConfig,
    classes,
    step: int,
    writer,
    progress: dict,
    save_best,
    source: ShardSource | None = None,
    what: str = "validation",
    hint: str = "",
    check_weights=None,
) -> dict:
    """Evaluate on val, log, and keep the best checkpoint by the configured criterion; returns the val
    metrics (+ `loss`). A non-finite validation loss, logit or score stops training (NonFiniteError)
    before anything is saved."""
    val = predict(
        model, preprocess, val_batches, accelerator, tcfg.lam, text_inputs, what=what, source=source, hint=hint
    )
    metrics = classification_metrics(val["labels"], val["logits"], classes)
    score = {"val_loss": -val["loss"], "val_bacc": metrics["balanced_accuracy"], "last": step}[tcfg.select]
    if not math.isfinite(score):
        raise NonFiniteError(f"{what}: the selection score ({tcfg.select}) is {score}; {hint}")
    if writer:
        writer.add_scalar("val/loss", val["loss"], step)
        writer.add_scalar("val/accuracy", metrics["accuracy"], step)
        writer.add_scalar("val/balanced_accuracy", metrics["balanced_accuracy"], step)
        writer.flush()  # validation is rare: its events reach the disk right away
    if progress["best_score"] is None or score > progress["best_score"]:
        if check_weights is not None:  # on every rank (same weights everywhere), so all ranks stop together
            check_weights("saving the best checkpoint")
        progress["best_score"], progress["best_step"] = score, step
        progress["best_val"] = {
            "loss": val["loss"],
            "balanced_accuracy": metrics["balanced_accuracy"],
            "accuracy": metrics["accuracy"],
        }
        if accelerator.is_main_process:
            save_best()
    accelerator.wait_for_everyone()
    return metrics | {"loss": val["loss"]}
