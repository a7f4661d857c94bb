"""`clipit predict MODEL_DIR INPUT...`: class probabilities from an exported model for image files, folders,
globs, shard sets and whole-slide images (docs/predict.md).

Every input is found first (predict_inputs.discover: a bad one stops the run before the model runs),
then streamed in batches of uint8 tiles at the model's input size, exactly as evaluation sees images
(decode, short side resized, centre crop; slides: tiles at the training resolution, evaluation/slide.py),
normalised on the device by DevicePreprocess (no augmentation), scored, and written row by row
(predict_output). Non-finite outputs stop the run.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import torch
import yaml

from clipit import layout
from clipit.evaluation.export import load_exported
from clipit.evaluation.predict_inputs import TOO_BIG, Resolution, batches, discover
from clipit.evaluation.predict_output import FeatureWriter, RowWriter
from clipit.evaluation.slide import TRAINING_FIELD_UM, TRAINING_SIDE_PX, PredictError, save_heatmap
from clipit.io import sweep_stale_temps, termination_cleans_up
from clipit.progress import Progress


def training_dataset(config: dict) -> str | None:
    """The dataset the exported model was trained on: config.json's `dataset`, else its source run's config."""
    if config.get("dataset"):
        return str(config["dataset"]).lower()
    try:
        run_config = yaml.safe_load(layout.config_file(Path(config["source_run"])).read_text())
        return str(run_config["data"]["name"]).lower()
    except Exception:
        return None


def resolution(model_dir: Path, config: dict, target_mpp: float | None) -> Resolution:
    """The field of one input: --target-mpp, else the export's own field_um (a copied export needs nothing
    else), else the training dataset's (a version-1 export: from its source run)."""
    size = int(config["input_size"])
    dataset = training_dataset(config)
    field = target_mpp * size if target_mpp else (config.get("field_um") or TRAINING_FIELD_UM.get(dataset))
    advice = (
        f"the resolution {model_dir} was trained at is unknown (dataset {dataset or 'not recorded'}); pass "
        f"--target-mpp MICRONS_PER_INPUT_PIXEL (the training images' µm/px x their side in px / {size})"
    )
    return Resolution(size, field, TOO_BIG * max(size, TRAINING_SIDE_PX.get(dataset, size)), advice)


class Scorer:
    """Probabilities (and, when asked, the backbone's embeddings, via a forward hook: one forward pass)."""

    def __init__(self, model, preprocess, features: bool):
        self.model, self.preprocess, self.device = model, preprocess, preprocess.mean.device
        self.features = None
        if features:
            model.backbone.register_forward_hook(lambda _m, _i, out: setattr(self, "features", out))

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        logits = self.model(self.preprocess(torch.from_numpy(images).to(self.device)))["logits"].float()
        feats = None if self.features is None else self.features.float().cpu().numpy()
        return torch.softmax(logits, dim=1).cpu().numpy(), feats


def heatmap_path(out: Path, slide: Path, taken: set[Path]) -> Path:
    """<out stem>.<slide stem>.heatmap.png next to --out (numbered if two slides share a stem)."""
    path, n = out.with_name(f"{out.stem}.{slide.stem}.heatmap.png"), 2
    while path in taken:
        path, n = out.with_name(f"{out.stem}.{slide.stem}-{n}.heatmap.png"), n + 1
    taken.add(path)
    return path


@termination_cleans_up()  # SIGTERM (preemption) ends through Python: no temporaries are left behind
def run_predict(
    model_dir: str | Path,
    inputs: list[str],
    out: str | Path | None = None,
    features: str | Path | None = None,
    split: str = "test",
    device: str = "cpu",
    batch_size: int = 32,
    mpp: float | None = None,
    target_mpp: float | None = None,
    min_tissue: float = 0.5,
    tile: bool = False,
    heatmap_class: str | None = None,
    stdout_json: bool = False,
) -> dict:
    """Predict every input; returns {"rows": n, "heatmaps": [paths], "slides": {path: tissue tiles}}."""
    model_dir = Path(model_dir)
    out, features = (Path(out) if out else None), (Path(features) if features else None)
    if batch_size < 1:
        raise PredictError(f"--batch-size {batch_size}: must be at least 1")
    for name, value in (("--mpp", mpp), ("--target-mpp", target_mpp)):
        if value is not None and not 0 < value < float("inf"):
            raise PredictError(f"{name} {value}: must be a positive number of µm per pixel")
    if not 0 <= min_tissue <= 1:
        raise PredictError(f"--min-tissue {min_tissue}: must be a fraction in [0, 1]")
    check_outputs(out, features)
    model, preprocess, config = load_exported(model_dir, device)
    classes = list(config["classes"])
    if heatmap_class is not None and heatmap_class not in classes:
        raise PredictError(f"--heatmap-class {heatmap_class!r}: not a class of {model_dir} ({', '.join(classes)})")
    res = resolution(model_dir, config, target_mpp)
    sources = discover(inputs, res, split=split, mpp=mpp, tile=tile, min_tissue=min_tissue)
    slides = [s for s in sources if s.kind == "slide"]
    if slides and out is None:
        raise PredictError(
            f"{slides[0].path}: a slide gives one row per tissue tile; pass --out FILE.csv (or .json); "
            "its heatmap is written next to it"
        )
    scorer = Scorer(model, preprocess, features is not None)
    summary = {"rows": 0, "heatmaps": [], "slides": {}}
    taken: set[Path] = set()
    with contextlib.ExitStack() as stack:
        rows = RowWriter(out, classes, stack, stdout_json)
        feats = None
        if features is not None:
            meta = {
                "format": "clipit-features",
                "classes": json.dumps(classes),
                "model": str(model_dir),
                "rows": f"row i = row i of {out.name if out else 'the printed table'}",
            }
            feats = FeatureWriter(features, config["num_features"], meta, stack)
        for source in sources:
            source.prepare(res)  # a slide's tissue grid: its tile count
            unit = "tile" if source.kind == "slide" else "image"
            with Progress(total=source.count(), desc=f"clipit predict {source.name}", unit=unit) as bar:
                source_probs = []
                for batch_rows, images in batches(source, res, batch_size):
                    probs, embeddings = scorer(images)
                    if not np.isfinite(probs).all():
                        bad = batch_rows[int(np.flatnonzero(~np.isfinite(probs).all(1))[0])].image
                        raise PredictError(
                            f"{model_dir}: the model gives non-finite outputs (on {bad}); re-export it "
                            "from a run whose training finished with finite losses"
                        )
                    rows.write(batch_rows, probs)
                    if feats is not None:
                        feats.write(embeddings)
                    if source.kind == "slide":
                        source_probs.append(probs)
                    summary["rows"] += len(batch_rows)
                    bar.update(len(batch_rows))
            if source.kind == "slide":
                probs = np.concatenate(source_probs) if source_probs else np.zeros((0, len(classes)), np.float32)
                summary["slides"][str(source.path)] = len(probs)
                summary["heatmaps"].append(
                    save_heatmap(
                        heatmap_path(out, source.path, taken),
                        source.grid,
                        probs,
                        classes,
                        source.path.name,
                        heatmap_class,
                    )
                )
                source.grid = None  # its thumbnail: one slide's at a time
        rows.close()
        if feats is not None:
            feats.close()
    return summary


def check_outputs(out: Path | None, features: Path | None) -> None:
    """Before any work: an output named like a folder is refused, and temporaries a killed predict left
    beside the outputs are swept."""
    for flag, path in (("--out", out), ("--features", features)):
        if path is None:
            continue
        if path.is_dir():
            raise PredictError(f"{flag} {path}: is a folder; name a file (e.g. {path / 'predictions.csv'})")
        sweep_stale_temps(path)
    if out is not None and features is not None and out.resolve() == features.resolve():
        raise PredictError(f"--out and --features both name {out}; give them different files")
