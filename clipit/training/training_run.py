"""One training run once it is set up (clipit/training/trainer.py builds it): its parts, and the steps
of the loop as methods: a training step, a validation, a resume checkpoint, the summary at the end.

Every rank runs the same steps; collectives (the stop poll, validation's gather, wait_for_everyone)
keep them in lockstep, so a stop signal or a non-finite value stops every rank at the same step.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from clipit import layout
from clipit.config import ExperimentConfig, TrainConfig
from clipit.io import atomic_write_json
from clipit.metrics import classification_metrics
from clipit.models.checkpoint import save_model
from clipit.models.clipit import clipit_loss
from clipit.training.coverage import EpochCoverage
from clipit.training.features import backbone_forwards_so_far
from clipit.training.logs import TrainLog
from clipit.training.predict import NonFiniteError, ShardSource, predict, samples
from clipit.training.signals import GracefulStop
from clipit.training.state import save_training_state
from clipit.training.text_side import TextInputs


@dataclass
class Window:
    """Data wait and images seen since the last train/ scalars: perf/ reports the window, not the run."""

    waited: float = 0.0
    images: int = 0
    start: float = field(default_factory=lambda: time.time())


@dataclass
class TrainingRun:
    """A (method, seed) cell ready to train: model, optimizer and scheduler prepared by the accelerator,
    the resume state loaded into them and into `progress`, the batches positioned after the resume step."""

    cfg: ExperimentConfig
    method: str
    seed: int
    run_dir: Path
    accelerator: Any
    plan: Any  # trainer.StepPlan
    model: Any
    preprocess: Any
    optimizer: Any
    scheduler: Any
    params: list  # the trainable parameters (gradient clipping)
    generator: torch.Generator  # augmentation and word drop draws of this rank
    text_inputs: TextInputs
    train_batches: Any
    val_batches: Any
    train_source: ShardSource
    val_source: ShardSource
    progress: dict  # step, best score and step, best_val, identity: what a resume checkpoint stores
    training_shards: str  # run_identity.training_shards of the shard set: recorded in train_summary.json
    resumed_from: int | None
    skip: int  # batches of the current epoch a resume has already trained
    meta: dict  # the best checkpoint's sidecar
    writer: Any = None  # TensorBoard (rank 0)
    cached: Any = None  # probe.CachedInputs when training on cached features
    restart: str = ""  # the command that starts the cell over
    stopped_early: int | None = None  # step at which `patience` validations without improvement ended the run
    window: Window = field(default_factory=Window)
    coverage: EpochCoverage | None = None  # what each epoch's batches held (train.log, train_summary.json)

    @property
    def tcfg(self) -> TrainConfig:
        return self.cfg.methods[self.method]

    @property
    def step(self) -> int:
        return self.progress["step"]

    @property
    def name(self) -> str:
        return f"{self.method} seed {self.seed}"

    @property
    def hint(self) -> str:
        return (
            f"lower methods.{self.method}.lr (or fix methods.{self.method}.lam / the shards), then start over with "
            f"`{self.restart}`"
        )

    # -----------------------------------------------------------------------------------------
    # The loop

    def train(self, forwards_before: int) -> dict:
        """Train to the end of the plan (or an early stop, or a stop signal); returns the summary."""
        plan, tcfg = self.plan, self.tcfg
        start = time.time()
        self.window = Window()
        log = TrainLog(
            self.run_dir,
            self.name,
            plan.total_steps,
            plan.batches_per_epoch,
            tcfg.log_every,
            self.step,
            self.accelerator.is_main_process,
        )
        log.start(self.resumed_from, self.accelerator.num_processes, plan.eval_every)
        train = self.train_source.manifest["splits"]["train"]
        self.coverage = EpochCoverage(
            train["count"],
            train["class_counts"],
            tcfg.batch_size,
            self.accelerator.num_processes,
            plan.batches_per_epoch,
        )
        self.coverage.restore(
            self.progress.get("coverage"), self.step // plan.batches_per_epoch, self.accelerator.is_main_process
        )
        stop = GracefulStop()
        self.model.train()
        try:
            while self.step < plan.total_steps and self.stopped_early is None:
                ended = self._epoch(log, stop)
                log.coverage(self.coverage.close(self.accelerator))
                if ended:
                    break
        finally:
            stop.restore()
            log.close()
            if self.writer:
                self.writer.close()
        return self.finish(log, start, forwards_before)

    def _epoch(self, log: TrainLog, stop: GracefulStop) -> bool:
        """One pass over the epoch's batches (from the resume offset); True when the run ends inside it."""
        plan = self.plan
        batches = islice(iter(self.train_batches), self.skip, plan.batches_per_epoch)
        self.skip = 0
        epoch = self.step // plan.batches_per_epoch
        fetch_start = time.time()
        for batch in self.train_source.batches(batches, f"training of {self.name}"):
            waited = time.time() - fetch_start
            self.coverage.add(batch, epoch)
            stopping = self.train_step(batch, waited, stop, log)
            step = self.step
            if step % plan.eval_every == 0 or step == plan.total_steps:
                val = self.validate()
                log.validation(step, val, self.progress["best_score"], self.progress["best_step"], self.tcfg.select)
                if self.tcfg.patience and step - self.progress["best_step"] >= self.tcfg.patience * plan.eval_every:
                    self.stopped_early = step  # the same on every rank: validation metrics are global
            if self.stopped_early is not None:
                return True
            if step < plan.total_steps and (step % plan.checkpoint_every == 0 or stopping):
                self.checkpoint()
            if stopping:
                stop.finish()
            if step >= plan.total_steps:
                return True
            fetch_start = time.time()
        return False

    def train_step(self, batch: dict, waited: float, stop: GracefulStop, log: TrainLog) -> bool:
        """One optimizer step on `batch`; returns whether a stop signal arrived (on any rank)."""
        acc, tcfg, world = self.accelerator, self.tcfg, self.accelerator.num_processes
        self.window.waited += waited
        images = self.preprocess(
            batch["images"].to(acc.device, non_blocking=True),
            augment=tcfg.augment_policy if tcfg.augment else None,
            generator=self.generator,
        )
        inputs = self.text_inputs(batch, acc.device, train=True, generator=self.generator)
        with acc.autocast():
            out = self.model(images, **inputs)
        labels = batch["labels"].to(acc.device, non_blocking=True)
        losses = clipit_loss(out, labels, inputs["text_emb"], tcfg.lam, tcfg.ce_input)
        local_bad = ~torch.isfinite(losses["loss"].detach())
        # one collective per step: a stop signal or a non-finite loss on any rank stops every rank here
        stopping, nonfinite = stop.poll(acc.device, local_bad)
        if nonfinite:  # before backward: under DeepSpeed backward also steps the optimizer
            raise NonFiniteError(self._nonfinite_loss(losses, batch, out, inputs, bool(local_bad)))
        acc.backward(losses["loss"])
        if tcfg.grad_clip and acc.state.deepspeed_plugin is None:  # DeepSpeed clips itself
            norm = acc.clip_grad_norm_(self.params, tcfg.grad_clip)
            if norm is not None and not torch.isfinite(torch.as_tensor(norm)).all():
                # gradients are all-reduced, so every rank sees the same norm and stops here
                raise NonFiniteError(
                    f"training step {self.step + 1} of {self.name}: the gradient norm is {float(norm)} "
                    f"(batch {self.train_source.describe(batch['keys'])}); {self.hint}"
                )
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.progress["step"] = step = self.step + 1
        self.window.images += len(images) * world
        log.step(step, losses["loss"], self.scheduler.get_last_lr()[0], len(images) * world, waited)
        if self.writer and (step % 10 == 0 or step == self.plan.total_steps):
            self._log_train_scalars(losses)
        return stopping

    # -----------------------------------------------------------------------------------------
    # Validation and checkpoints

    def validate(self) -> dict:
        """Evaluate on val, log, and keep the best checkpoint by the configured criterion; returns the val
        metrics (+ `loss`). A non-finite validation loss, logit or score stops training (NonFiniteError)
        before anything is saved."""
        acc, tcfg, step = self.accelerator, self.tcfg, self.step
        what = f"validation at step {step} of {self.name}"
        val = predict(
            self.model,
            self.preprocess,
            self.val_batches,
            acc,
            tcfg.lam,
            self.text_inputs,
            what=what,
            source=self.val_source,
            hint=self.hint,
            ce_input=tcfg.ce_input,
        )
        metrics = classification_metrics(val["labels"], val["logits"], self.meta["classes"])
        score = {
            "val_loss": -val["loss"],
            "val_bacc": metrics["balanced_accuracy"],
            "val_acc": metrics["accuracy"],
            "last": step,
        }[tcfg.select]
        if not math.isfinite(score):
            raise NonFiniteError(f"{what}: the selection score ({tcfg.select}) is {score}; {self.hint}")
        if self.writer:
            self.writer.add_scalar("val/loss", val["loss"], step)
            self.writer.add_scalar("val/accuracy", metrics["accuracy"], step)
            self.writer.add_scalar("val/balanced_accuracy", metrics["balanced_accuracy"], step)
            self.writer.flush()  # validation is rare: its events reach the disk right away
        progress = self.progress
        if progress["best_score"] is None or score > progress["best_score"]:
            # on every rank (same weights everywhere), so all ranks stop together
            self.check_weights("saving the best checkpoint")
            progress["best_score"], progress["best_step"] = score, step
            progress["best_val"] = {
                "loss": val["loss"],
                "balanced_accuracy": metrics["balanced_accuracy"],
                "accuracy": metrics["accuracy"],
            }
            if acc.is_main_process:
                self.save_best()
        acc.wait_for_everyone()
        return metrics | {"loss": val["loss"]}

    def check_weights(self, what: str) -> None:
        """Nothing non-finite is ever saved (best checkpoint or resume state)."""
        bad = [
            n
            for n, p in self.accelerator.unwrap_model(self.model).named_parameters()
            if p.requires_grad and not torch.isfinite(p.detach()).all()
        ]
        if bad:
            raise NonFiniteError(
                f"training step {self.step} of {self.name}: non-finite weights in {len(bad)} "
                f"tensors (e.g. {bad[0]}) before {what}; {self.hint}"
            )

    def save_best(self) -> None:
        """The current weights as best.safetensors (rank 0; every rank has run check_weights before)."""
        save_model(
            layout.best(self.run_dir),
            self.accelerator.unwrap_model(self.model),
            self.meta | {"step": self.step},
            full=self.cfg.model.weights in (None, "random"),
        )

    def checkpoint(self) -> None:
        """The resume state (every rank takes part: DeepSpeed saves its partitions)."""
        self.check_weights("saving a resume checkpoint")
        if self.writer:
            self.writer.flush()
        self.progress["coverage"] = self.coverage.state(self.accelerator)  # a collective: every rank is here
        save_training_state(
            self.run_dir,
            self.accelerator,
            self.model,
            self.optimizer,
            self.scheduler,
            self.generator,
            self.progress,
        )

    def finish(self, log: TrainLog, start: float, forwards_before: int) -> dict:
        """train_summary.json (rank 0; its presence marks the run as trained); returns the summary."""
        plan, progress = self.plan, self.progress
        summary = {
            "steps": plan.total_steps,
            "best_step": progress["best_step"],
            "select": self.tcfg.select,
            "world_size": self.accelerator.num_processes,
            "batches_per_epoch": plan.batches_per_epoch,
            "resumed_from_step": self.resumed_from,
            "stopped_early_at_step": self.stopped_early,
            "best_val": progress.get("best_val"),  # val metrics of the selected checkpoint (LoRA search)
            # images this process ran through the backbone (a feature-cache build included)
            "backbone_forwards": backbone_forwards_so_far() - forwards_before,
            "wall_s": round(time.time() - start, 2),
            **({"feature_cache": str(self.cached.cache_dir)} if self.cached else {}),
            "coverage": self.coverage.epochs if self.coverage else [],  # per epoch (training/coverage.py)
            "identity": progress.get("identity"),  # what a rerun compares before it reuses this run
            "training_shards": self.training_shards,
        }
        if self.accelerator.is_main_process:
            atomic_write_json(layout.train_summary(self.run_dir), summary)
        log.finish(summary)
        self.accelerator.wait_for_everyone()
        return summary

    # -----------------------------------------------------------------------------------------
    # Logs

    def _log_train_scalars(self, losses: dict) -> None:
        """Loss terms, lr, images/s and data wait % of the window; then a fresh window."""
        writer, step, window = self.writer, self.step, self.window
        elapsed = time.time() - window.start
        for name, value in losses.items():
            writer.add_scalar(f"train/{name}", float(value.detach()), step)
        writer.add_scalar("train/lr", self.scheduler.get_last_lr()[0], step)
        writer.add_scalar("perf/images_per_s", window.images / max(elapsed, 1e-9), step)
        writer.add_scalar("perf/data_wait_pct", 100 * window.waited / max(elapsed, 1e-9), step)
        self.window = Window()

    def _nonfinite_loss(self, losses: dict, batch: dict, out: dict, inputs: dict, local: bool) -> str:
        """The one-line reason a training step stopped: which term is not finite, and the samples behind it."""
        where, source, hint = f"training step {self.step + 1} of {self.name}", self.train_source, self.hint
        if not local:
            return f"{where}: the loss is not finite on another rank (its error line names the batch); {hint}"
        terms = ", ".join(f"{k} {float(v.detach())}" for k, v in losses.items() if not torch.isfinite(v.detach()))
        keys = list(dict.fromkeys(batch["keys"]))
        text = inputs.get("text_emb")
        bad_text = (
            (~torch.isfinite(text.float()).all(dim=1)).cpu().tolist() if text is not None and text.numel() else []
        )
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
