"""The run's provenance.json (clipit/provenance.py gathers the facts): written by rank 0 when a training
attempt starts, before the first step, so a run that dies still says what it ran on."""

from __future__ import annotations

from pathlib import Path

from clipit.config import ExperimentConfig, to_dict
from clipit.errors import ClipitError
from clipit.io import make_dirs
from clipit.methods import method_spec
from clipit.models import clip_baselines
from clipit.models.backbones import resolve_weights
from clipit.provenance import collect, write_provenance
from clipit.training.accel import raise_together
from clipit.weights import resolve_pairing_checkpoint


def weights_read(cfg: ExperimentConfig, method: str, warm_start: Path | None) -> dict[str, str | None]:
    """Role -> where the run read its weights from (a local path is hashed, a hub ID recorded as it is)."""
    tcfg, found = cfg.methods[method], {}
    if method_spec(tcfg.method).uses_clip:
        found["clip"] = clip_baselines.clip_source(cfg)[1]
    else:
        try:
            source = resolve_weights(cfg.model.backbone, cfg.model.weights, cfg.model.weights_file)
            found["backbone"] = source.location if source.kind != "random" else "random"
        except ClipitError:  # the model was built already; an unresolvable name here records nothing
            found["backbone"] = None
    # the pairing model chose every image's report (and is the text tower under text_encoder: tower)
    found["pairing"] = resolve_pairing_checkpoint(cfg.pairing.model, cfg.pairing.checkpoint, cfg.model.weights_file)
    if warm_start is not None:
        found["warm_start"] = str(Path(warm_start).with_suffix(".safetensors"))
    return found


def transform_record(preprocess, augment: bool) -> dict:
    """What every image goes through: the loader's resize/crop, then DevicePreprocess."""
    return {
        "input_size": int(preprocess.size),
        "mean": [float(v) for v in preprocess.mean.flatten().tolist()],
        "std": [float(v) for v in preprocess.std.flatten().tolist()],
        "resize": "short side to input_size (bilinear), centre crop",
        "augment": "random flips and 90-degree rotations" if augment else "none",
    }


def record_provenance(
    cfg: ExperimentConfig, method: str, run_dir: Path, accelerator, data_sha256: str, preprocess, warm_start=None
) -> Path | None:
    """Rank 0 writes <run>/provenance.json (called on every rank: a failure stops them all)."""
    path, error = None, None
    if accelerator.is_main_process:
        try:
            path = _write(cfg, method, run_dir, accelerator, data_sha256, preprocess, warm_start)
        except ClipitError as err:  # e.g. a read-only run folder
            error = err
    raise_together(accelerator, error, ClipitError(f"{run_dir}: rank 0 could not write its provenance.json"))
    return path


def _write(cfg: ExperimentConfig, method: str, run_dir: Path, accelerator, data_sha256, preprocess, warm_start):
    tcfg = cfg.methods[method]
    record = collect(
        config=to_dict(cfg),
        device=accelerator.device,
        processes=accelerator.num_processes,
        weights=weights_read(cfg, method, warm_start),
        data_sha256=data_sha256,
        transform=transform_record(preprocess, tcfg.augment),
        precision=tcfg.precision,
    )
    record["run"] = {"method": method, "kind": tcfg.method, "experiment": cfg.name, "dataset": cfg.data.name}
    make_dirs(run_dir)
    return write_provenance(run_dir, record)
