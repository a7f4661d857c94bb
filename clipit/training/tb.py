"""TensorBoard as a comparison tool: each run's scalars and HParams in the run's own event files.

`tensorboard --logdir <output_dir>/tb` (clipit/layout.py) names the runs `<method>/seed-<n>`. Every
run carries its hyperparameters (HParams plugin: method, backbone, dataset, seed, lam, LoRA, fine-
tuning, text side, lr, batch size ...) and the metrics the HParams table ranks runs by: the last
`train/loss`, `val/loss` and `val/balanced_accuracy` of training and the `test/*` scalars that
evaluation writes at the run's final step. The hparams summaries are written into the run's own
event file (not as `SummaryWriter.add_hparams` does, into an extra timestamped sub-run), so the
HParams view has exactly one session per run, named like the run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summaries

from clipit import layout
from clipit.config import ExperimentConfig
from clipit.methods import method_spec

# the metric columns of the HParams view (the last value of each scalar in the run)
METRICS = ("test/balanced_accuracy", "test/accuracy", "test/loss", "val/balanced_accuracy", "val/loss", "train/loss")
TEST_SCALARS = ("balanced_accuracy", "accuracy", "loss")


def open_writer(run_dir: Path, resumed_from: int | None) -> SummaryWriter:
    """The run's writer. A fresh start clears events of an earlier, uncheckpointed attempt (they would
    mix in); on resume TensorBoard drops what an interrupted attempt wrote after its last checkpoint."""
    tb = layout.tensorboard_dir(run_dir)
    if resumed_from is None:
        shutil.rmtree(tb, ignore_errors=True)
    return SummaryWriter(str(tb), purge_step=None if resumed_from is None else resumed_from + 1)


def run_hparams(cfg: ExperimentConfig, method: str, seed: int, world: int) -> dict:
    """What tells the grid's runs apart, as HParams columns (strings and numbers only)."""
    t, m = cfg.methods[method], cfg.model
    finetune = method_spec(t.method).finetune_shown(t.finetune, m.lora.enabled)
    return {
        "method": method,
        "kind": t.method,
        "experiment": cfg.name,
        "dataset": str(cfg.data.name),
        "backbone": m.backbone,
        "weights": str(m.weights),
        "seed": seed,
        "finetune": finetune,
        "text_encoder": t.text_encoder,
        "lam": t.lam,
        "lr": t.lr,
        "optimizer": t.optimizer,
        "schedule": t.schedule,
        "batch_size": t.batch_size,
        "global_batch_size": t.batch_size * world,
        "epochs": t.epochs,
        "lora.enabled": str(m.lora.enabled).lower(),
        "lora.r": m.lora.r,
        "lora.alpha": m.lora.alpha,
        "lora.targets": ",".join(m.lora.targets),
        "word_drop": t.word_drop,
        "select": t.select,
        "warm_start": str(t.warm_start),
    }


def write_hparams(writer: SummaryWriter, hparams: dict) -> None:
    """The experiment (columns) and the session start (this run's values) into the run's own file."""
    experiment, start, _ = hparams_summaries(hparams, {tag: 0.0 for tag in METRICS})
    for summary in (experiment, start):
        writer.file_writer.add_summary(summary)
    writer.flush()


def final_step(run_dir: Path) -> int:
    """The last step training ran (train_summary.json), 0 when unknown."""
    try:
        summary = json.loads(layout.train_summary(run_dir).read_text())
        return int(summary.get("stopped_early_at_step") or summary.get("steps") or 0)
    except (OSError, ValueError, TypeError, AttributeError):
        return 0


def log_evaluation(run_dir: Path, split: str, metrics: dict) -> None:
    """`<split>/...` scalars at the run's final training step, then the HParams session's end (status
    success). Rank 0 only; the val split is left out (training's val/ scalars are the last validation)."""
    if split == "val":
        return
    step = final_step(run_dir)
    with SummaryWriter(str(layout.tensorboard_dir(run_dir))) as writer:
        for name in TEST_SCALARS:
            writer.add_scalar(f"{split}/{name}", float(metrics[name]), step)
        if split == "test":
            *_, end = hparams_summaries({}, {})
            writer.file_writer.add_summary(end)
