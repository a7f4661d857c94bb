"""Experiment trackers (`logging.trackers`): TensorBoard always, W&B and MLflow on request, through
accelerate's trackers (`Accelerator(log_with=...)`, `init_trackers`, `log`, `end_training`).

TensorBoard stays clipit's own writer (clipit/training/tb.py: one HParams session per run, purged on
resume, the tree the report's curves read). W&B and MLflow are accelerate's WandBTracker and MLflowTracker:
the W&B project / MLflow experiment is the config's `name`, the run is named `<method>/seed-<n>`, and
each gets the run's hyperparameters plus its provenance (clipit/provenance.py) as its config. Each
training attempt is its own W&B / MLflow run (a resumed run starts a new one from its resume step).

The training loop keeps one `writer`: RunTrackers sends every scalar to TensorBoard and, one dict per
step, to accelerate's trackers.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from clipit import layout
from clipit.config import ExperimentConfig
from clipit.errors import ConfigError, one_line
from clipit.provenance import read_provenance
from clipit.training.accel import raise_together
from clipit.training.tb import open_writer, run_hparams, write_hparams


def accelerate_trackers(cfg: ExperimentConfig) -> list[str]:
    """The trackers accelerate runs (all but tensorboard), each checked to be usable here: accelerate itself
    would drop a tracker whose package is missing with a debug line only."""
    names = [n for n in cfg.logging.trackers if n != "tensorboard"]
    for name in names:
        if importlib.util.find_spec(name) is None:
            raise ConfigError(
                f"logging.trackers lists {name}, but the {name} package is not installed here; "
                f"pip install -c constraints.txt 'clipit[{name}]', or take {name} out of logging.trackers"
            )
    if "mlflow" in names and not os.environ.get("MLFLOW_TRACKING_URI"):
        raise ConfigError(
            "logging.trackers lists mlflow, but MLFLOW_TRACKING_URI is not set; export it (your tracking "
            "server, e.g. http://mlflow.lab:5000, or a local store: file:DIR with MLFLOW_ALLOW_FILE_STORE=true)"
        )
    return names


class RunTrackers:
    """The training loop's `writer`: add_scalar / flush / close, to TensorBoard and accelerate's trackers."""

    def __init__(self, tensorboard, accelerator=None):
        self.tensorboard, self.accelerator = tensorboard, accelerator
        self.pending: dict[str, float] = {}
        self.step: int | None = None

    def add_scalar(self, tag: str, value, step: int) -> None:
        self.tensorboard.add_scalar(tag, value, step)
        if self.accelerator is None:
            return
        if self.step is not None and step != self.step:
            self._send()
        self.step = step
        self.pending[tag] = float(value)

    def _send(self) -> None:
        if self.pending:
            self.accelerator.log(self.pending, step=self.step)
        self.pending = {}

    def flush(self) -> None:
        self.tensorboard.flush()
        if self.accelerator is not None:
            self._send()

    def close(self) -> None:
        self.tensorboard.close()
        if self.accelerator is not None:
            self._send()
            self.accelerator.end_training()


def open_trackers(
    cfg: ExperimentConfig, method: str, seed: int, run_dir: Path, accelerator, resumed_from: int | None
) -> RunTrackers | None:
    """Called on every rank: rank 0 gets the run's TensorBoard writer (+ HParams on a fresh start) and, when
    `logging.trackers` names them, accelerate's trackers started with the hyperparameters and provenance as
    their config; the other ranks get None. A tracker that fails to start stops every rank."""
    trackers, error = None, None
    if accelerator.is_main_process:
        try:
            trackers = _open(cfg, method, seed, run_dir, accelerator, resumed_from)
        except ConfigError as err:
            error = err
    raise_together(
        accelerator, error, ConfigError("logging.trackers: rank 0 could not start them (see its error line)")
    )
    return trackers


def _open(cfg: ExperimentConfig, method: str, seed: int, run_dir: Path, accelerator, resumed_from: int | None):
    hparams = run_hparams(cfg, method, seed, accelerator.num_processes)
    writer = open_writer(run_dir, resumed_from)
    if resumed_from is None:
        write_hparams(writer, hparams)
    if not accelerator.log_with:
        return RunTrackers(writer)
    name = f"{method}/seed-{seed}"
    config = hparams | {"resumed_from": resumed_from if resumed_from is not None else -1}
    record = read_provenance(run_dir) or {}
    git = (record.get("clipit") or {}).get("git") or {}
    config |= {
        "provenance.git_commit": git.get("commit", "none"),
        "provenance.git_dirty": str(git.get("dirty", "unknown")),
        "provenance.config_sha256": record.get("config_sha256", "none"),
        "provenance.training_shards_sha256": (record.get("data") or {}).get("training_shards_sha256") or "none",
        "provenance.device": (record.get("device") or {}).get("name", "unknown"),
    }
    kwargs = {
        "wandb": {
            "name": name,
            "group": method,
            "dir": os.environ.get("WANDB_DIR") or str(layout.wandb_dir(_output_dir(run_dir))),
        },
        "mlflow": {"run_name": name, "tags": {"clipit.run_dir": str(Path(run_dir).resolve())}},
    }
    if "wandb" in accelerator.log_with and not os.environ.get("WANDB_DIR"):
        Path(kwargs["wandb"]["dir"]).mkdir(parents=True, exist_ok=True)
    try:
        accelerator.init_trackers(cfg.name, config=config, init_kwargs=kwargs)
    except Exception as err:  # a tracker that cannot start (no login, server down): one line, not a traceback
        writer.close()
        trackers = ", ".join(str(t) for t in accelerator.log_with)
        raise ConfigError(
            f"logging.trackers: {trackers} did not start ({one_line(err)}); log in (`wandb login`) or set "
            "WANDB_MODE=offline, check MLFLOW_TRACKING_URI, or take it out of logging.trackers"
        ) from None
    return RunTrackers(writer, accelerator)


def _output_dir(run_dir: Path) -> Path:
    rid = layout.parse_run_dir(run_dir)
    return rid.output_dir if rid is not None else Path(run_dir)
