"""The training loop on Accelerate: one code path for 1 CPU process, torchrun/accelerate launch and srun.

`fit` trains one (method, seed) cell from the shards (`setup_run` builds a TrainingRun whose methods are
the loop's steps: clipit/training/training_run.py) and leaves in its run directory:
    best.safetensors / best.json   the checkpoint selected on validation
    train.log                      plain progress lines, appended (clipit/training/logs.py)
    checkpoints/latest/            resume state (see state.py); a rerun continues from it
    train_summary.json             steps, best step, wall time (its presence marks the run as trained)
and its TensorBoard scalars + HParams in <output_dir>/tb/<method>/seed-<n> (clipit/training/tb.py).
SIGTERM/SIGUSR2 save a resume checkpoint at the next step boundary, then stop (or requeue under submitit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import set_seed

from clipit import layout
from clipit.config import ExperimentConfig, TrainConfig, dump_config
from clipit.errors import ClipitError
from clipit.io import sweep_stale_temps_in
from clipit.methods import method_spec
from clipit.models.clipit import param_groups
from clipit.models.factory import build_model
from clipit.models.speed import apply_speed_settings
from clipit.shards.manifest import ShardError, load_manifest, split_counts
from clipit.shards.order import require_shuffled_train
from clipit.shards.validate import verify_shard_set
from clipit.training.accel import claim_deepspeed_run, main_process_lock, make_accelerator, raise_together
from clipit.training.epochs import batches_per_rank
from clipit.training.features import backbone_forwards_so_far
from clipit.training.imported import import_probe_head
from clipit.training.loader import eval_loader, train_loader
from clipit.training.predict import ShardSource
from clipit.training.probe import cached_inputs
from clipit.training.run_files import checkpoint_meta, save_untrained
from clipit.training.run_identity import finished_run, run_identity, training_shards
from clipit.training.run_provenance import record_provenance
from clipit.training.state import ResumeError, load_training_state
from clipit.training.text_side import TextInputs
from clipit.training.trackers import accelerate_trackers, open_trackers
from clipit.training.training_run import TrainingRun


@dataclass(frozen=True)
class StepPlan:
    """How long a run is and when it validates and checkpoints, in optimizer steps."""

    batches_per_epoch: int  # per rank; a resume checkpoint is only valid for the same value
    total_steps: int
    eval_every: int
    checkpoint_every: int


def step_plan(manifest: dict, tcfg: TrainConfig, world: int, method: str | None = None) -> StepPlan:
    """The step plan for the train split of `manifest` over `world` processes of `tcfg.batch_size` each: an
    epoch is train samples // (batch_size x world) steps (training/epochs.py: each sample at most once)."""
    key = f"methods.{method}.batch_size" if method else "batch_size"
    batches_per_epoch = batches_per_rank(manifest["splits"]["train"]["count"], tcfg.batch_size, world, key)
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
            params, lr=tcfg.lr, momentum=tcfg.momentum, weight_decay=tcfg.weight_decay, nesterov=tcfg.nesterov
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


def make_scheduler(tcfg: TrainConfig, optimizer, total_steps: int, batches_per_epoch: int = 1):
    if tcfg.schedule == "none":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    floor = tcfg.min_lr / tcfg.lr if tcfg.lr else 0.0
    if tcfg.schedule == "cosine_epochs":  # CosineAnnealingLR's closed form at T_cur = finished epochs
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (step // batches_per_epoch) / tcfg.t_max)),
        )
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps)),
    )


def fit(cfg: ExperimentConfig, method: str, seed: int, run_dir: str | Path, warm_start: Path | None = None) -> dict:
    """Train one cell (resuming from its latest checkpoint); returns the summary. Finished runs are skipped.

    Rank 0 holds the run directory's lock (clipit.locks) throughout: a second launch on the same cell
    stops with one line instead of writing the same files."""
    run_dir = Path(run_dir)
    summary_path = layout.train_summary(run_dir)
    if summary_path.exists():
        return finished_run(cfg, method, seed, run_dir, warm_start)
    accelerator = make_accelerator(cfg.methods[method], accelerate_trackers(cfg))
    with main_process_lock(accelerator, run_dir, "run directory"):
        if summary_path.exists():  # finished by the previous holder of the lock
            return finished_run(cfg, method, seed, run_dir, warm_start)
        if accelerator.is_main_process:  # a killed writer's half-written files (e.g. .best.safetensors.*.tmp)
            sweep_stale_temps_in(run_dir)
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
    tcfg = cfg.methods[method]
    forwards_before = backbone_forwards_so_far()
    set_seed(seed)
    manifest = verified_manifest(accelerator, cfg.shards.dir)
    model, preprocess = build_model(cfg, tcfg, len(manifest["classes"]), manifest["embedding"]["dim"], warm_start)
    record_provenance(cfg, method, run_dir, accelerator, training_shards(manifest), preprocess, warm_start)
    if not method_spec(tcfg.method).trains:  # e.g. the zero-shot prompt ensemble: saved as it is built
        return save_untrained(cfg, method, seed, run_dir, model, preprocess, manifest, accelerator)
    if tcfg.head_from:  # an existing probe (e.g. kaiko eva's) instead of training one
        return import_probe_head(cfg, method, seed, run_dir, model, preprocess, manifest, accelerator)
    require_shuffled_train(cfg.shards.dir, manifest)
    return setup_run(cfg, method, seed, run_dir, warm_start, accelerator, manifest, model, preprocess).train(
        forwards_before
    )


def setup_run(
    cfg: ExperimentConfig,
    method: str,
    seed: int,
    run_dir: Path,
    warm_start: Path | None,
    accelerator,
    manifest: dict,
    model,
    preprocess,
) -> TrainingRun:
    """Everything the loop needs, in this order: speed settings, optimizer and schedule, the feature cache,
    the accelerator's wrapping, the resume state, the batches from the resume step, the run's outputs."""
    tcfg = cfg.methods[method]
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
    plan = step_plan(manifest, tcfg, world, method)
    optimizer = make_optimizer(tcfg, groups)
    scheduler = make_scheduler(tcfg, optimizer, plan.total_steps, plan.batches_per_epoch)
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
    epoch, skip = divmod(progress["step"], plan.batches_per_epoch)
    train_source, val_source, train_batches, val_batches = batches(
        cfg, method, seed, accelerator, manifest, plan, preprocess.size, cached, epoch
    )
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, layout.config_file(run_dir))
    writer = open_trackers(cfg, method, seed, run_dir, accelerator, resumed_from)  # rank 0's; None elsewhere
    return TrainingRun(
        cfg=cfg,
        method=method,
        seed=seed,
        run_dir=run_dir,
        accelerator=accelerator,
        plan=plan,
        model=model,
        preprocess=preprocess,
        optimizer=optimizer,
        scheduler=scheduler,
        params=params,
        generator=generator,
        text_inputs=text_inputs,
        train_batches=train_batches,
        val_batches=val_batches,
        train_source=train_source,
        val_source=val_source,
        progress=progress,
        training_shards=training_shards(manifest),
        resumed_from=resumed_from,
        skip=skip,
        meta=checkpoint_meta(cfg, method, seed, manifest, preprocess.size),
        writer=writer,
        cached=cached,
        restart=restart,
    )


def batches(cfg: ExperimentConfig, method: str, seed: int, accelerator, manifest, plan, size, cached, epoch: int):
    """(train source, val source, train batches from `epoch` on, val batches): the loaders over the shards,
    or the same batches from the cached features."""
    tcfg, world = cfg.methods[method], accelerator.num_processes
    train_source = ShardSource(Path(cfg.shards.dir), "train", manifest)
    val_source = ShardSource(Path(cfg.shards.dir), "val", manifest)
    if cached:  # the same batches as the loaders below would give, from the cached features
        train_batches = cached.train_batches(
            tcfg.batch_size, seed, tcfg.num_workers, accelerator.process_index, world, epoch
        )
        val_batches = cached.val_batches(2 * tcfg.batch_size, accelerator.process_index, world)
    else:
        train_batches = train_loader(
            train_source.urls,
            split_counts(manifest, "train"),
            tcfg.batch_size,
            seed=seed,
            rank=accelerator.process_index,
            world=world,
            num_workers=tcfg.num_workers,
            load_size=size,
            start_epoch=epoch,
            image=manifest.get("image"),
        )
        val_batches = eval_loader(
            val_source.urls,
            2 * tcfg.batch_size,
            accelerator.process_index,
            world,
            tcfg.num_workers,
            size,
            image=manifest.get("image"),
        )
    return train_source, val_source, train_batches, val_batches
