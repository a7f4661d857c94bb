"""The identity of a training cell (what its trained weights depend on) and of its evaluation (what its
metrics depend on besides the weights), and the checks a rerun makes before it reuses either.

train_summary.json and the resume checkpoint's progress.json record `run_identity`; metrics.json records
`evaluation_identity`. A rerun with another identity stops with one line (clipit/identity.py) unless
`--overwrite` asks to replace the run (cli_runs.py). Light imports only: `clipit grid --dry-run` asks it per cell.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import fields
from pathlib import Path

from clipit import layout
from clipit.config import ExperimentConfig, TrainConfig
from clipit.errors import ClipitError
from clipit.identity import OVERWRITE, changed_output, identity_changes
from clipit.io import read_json_object, sha256_file
from clipit.shards.manifest import load_manifest

# how a run is made, not what it is (num_workers counts: each worker shuffles its own stream of shards)
NOT_COMPARED = ("checkpoint_every", "log_every")
# settings added after identities were first recorded: left out at their default (the behaviour before
# they existed), so a run recorded earlier stays current; any other value is compared
LATER_DEFAULTS = {
    f.name: f.default for f in fields(TrainConfig) if f.name in ("t_max", "ce_input", "augment_policy", "train_head")
}


def run_identity(
    cfg: ExperimentConfig, method: str, seed: int, manifest: dict, world: int, warm_start: Path | None
) -> dict:
    """What a run's trajectory depends on, keyed as the config spells it: a resume checkpoint is only
    continued by a launch with the same identity (checkpoint_every and log_every change no result)."""
    tcfg, mcfg = cfg.methods[method], cfg.model
    shards = hashlib.sha256(
        json.dumps({k: manifest.get(k) for k in ("splits", "embedding", "texts", "classes")}, sort_keys=True).encode()
    ).hexdigest()
    identity = {
        "methods": {
            method: {
                k: v
                for k, v in vars(tcfg).items()
                if k not in NOT_COMPARED and not (k in LATER_DEFAULTS and v == LATER_DEFAULTS[k])
            }
        },
        "model": {
            "backbone": mcfg.backbone,
            "weights": mcfg.weights,
            "image_size": mcfg.image_size,
            **({"timm_kwargs": mcfg.timm_kwargs} if mcfg.timm_kwargs else {}),  # absent: older identities hold
            "lora": vars(mcfg.lora).copy(),
            "kd_layers": mcfg.kd_layers,
        },
        "seed": seed,
        "processes": world,
        "shards": {"manifest_sha256": shards},
    }
    if mcfg.mean is not None:  # normalisation override (only when set: earlier identities stay valid)
        identity["model"] |= {"mean": mcfg.mean, "std": mcfg.std}
    if tcfg.text_encoder == "tower":
        identity["pairing"] = {"model": cfg.pairing.model, "checkpoint": cfg.pairing.checkpoint}
    if warm_start is not None and Path(warm_start).with_suffix(".safetensors").exists():
        identity["warm_start"] = {"sha256": sha256_file(Path(warm_start).with_suffix(".safetensors"))}
    return json.loads(json.dumps(identity, default=str))


def training_shards(manifest: dict) -> str:
    """sha256 of what a trained run depends on in a shard set: its train and val shards, embedding and texts."""
    record = {k: manifest.get(k) for k in ("embedding", "texts", "classes")}
    record["splits"] = {s: (manifest.get("splits") or {}).get(s) for s in ("train", "val")}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _manifest_or_none(cfg: ExperimentConfig) -> dict | None:
    try:
        return load_manifest(cfg.shards.dir)
    except ClipitError:
        return None


def finished_changes(cfg: ExperimentConfig, method: str, seed: int, run_dir: Path, warm_start: Path | None) -> str:
    """How the identity train_summary.json records differs from the one requested now ('' if equal, or if
    the summary records none: runs written before identities were recorded are reused as they are). The
    process count is not compared (it is how a finished run was made, not what it is); the shard set by its
    training splits (training_shards), and only while it is on disk: a test split rebuilt after training
    changes no trained result, and evaluation checks that split itself."""
    summary = read_json_object(layout.train_summary(run_dir), f"rerun `clipit train` with `{OVERWRITE}`")
    stored = summary.get("identity")
    if not isinstance(stored, dict):
        return ""
    manifest = _manifest_or_none(cfg)
    now = run_identity(cfg, method, seed, manifest or {}, stored.get("processes"), warm_start)
    stored, now = {k: v for k, v in stored.items() if k != "shards"}, {k: v for k, v in now.items() if k != "shards"}
    if manifest is not None and summary.get("training_shards") not in (None, training_shards(manifest)):
        stored["training_shards"], now["training_shards"] = summary["training_shards"], training_shards(manifest)
    return identity_changes(stored, now)


def checkpoint_changes(cfg: ExperimentConfig, method: str, seed: int, run_dir: Path, warm_start: Path | None) -> str:
    """How the identity of the run's resume checkpoint differs from the one requested now ('' if equal or
    unreadable: loading it reports damage)."""
    from clipit.training.state import PROGRESS  # the checkpoint format's home

    path = layout.resume_dir(run_dir) / PROGRESS
    try:
        stored = json.loads(path.read_text()).get("identity")
    except (OSError, ValueError, AttributeError):
        return ""
    if not isinstance(stored, dict):
        return ""
    manifest = _manifest_or_none(cfg) or {}
    return identity_changes(stored, run_identity(cfg, method, seed, manifest, stored.get("processes"), warm_start))


def finished_run(cfg: ExperimentConfig, method: str, seed: int, run_dir: Path, warm_start: Path | None) -> dict:
    """The summary of a finished run, once its recorded identity equals the one requested now: a rerun with
    another config (a changed --set, backbone, warm start or shard set) must not print the old result as its
    own."""
    changes = finished_changes(cfg, method, seed, run_dir, warm_start)
    if changes:
        raise changed_output(
            layout.train_summary(run_dir),
            f"{method} seed {seed} finished",
            changes,
            "set output_dir to a new folder",
            f"rerun `clipit train --method {method} --seed {seed}` with `{OVERWRITE}`",
        )
    return read_json_object(layout.train_summary(run_dir), f"rerun `clipit train` with `{OVERWRITE}`")


def stale_run_changes(cfg: ExperimentConfig, method: str, seed: int, run_dir: Path, warm_start: Path | None) -> str:
    """What `--overwrite` asks before it clears a run directory: how its finished run, else its resume
    checkpoint, differs from the requested identity ('' when it holds neither or they are current)."""
    if layout.is_trained(run_dir):
        return finished_changes(cfg, method, seed, run_dir, warm_start)
    return checkpoint_changes(cfg, method, seed, run_dir, warm_start)


def evaluation_identity(manifest: dict, split: str) -> dict:
    """What a run's metrics depend on besides its weights: the evaluated split of the shard set."""
    record = {"classes": manifest.get("classes"), "split": (manifest.get("splits") or {}).get(split)}
    return {"split": split, "shards_sha256": hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()}


def evaluated_changes(metrics: dict, manifest: dict | None, split: str) -> str:
    """How the identity a metrics file records differs from the one requested now ('' when equal, when it
    records none (written before identities) or when the shard set is gone)."""
    stored = metrics.get("identity")
    if not isinstance(stored, dict) or manifest is None:
        return ""
    return identity_changes(stored, evaluation_identity(manifest, split))
