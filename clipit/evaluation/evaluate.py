"""Test evaluation of a trained run: metrics.json (accuracy, balanced accuracy, per class) and
predictions.npz (keys, labels, logits) for the Omega analysis. Only the vision model runs. The test
metrics also go to the run's TensorBoard events (test/*, at the final training step: clipit/training/tb.py)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from clipit import layout
from clipit.config import ExperimentConfig
from clipit.errors import ClipitError
from clipit.identity import OVERWRITE, changed_output
from clipit.io import atomic_save_npz, atomic_write_json, read_json
from clipit.methods import method_spec
from clipit.metrics import classification_metrics
from clipit.models.checkpoint import TEXT_TOWER, load_model_state
from clipit.models.factory import build_model
from clipit.progress import progress
from clipit.shards.manifest import load_manifest
from clipit.training.accel import main_process_lock, make_accelerator
from clipit.training.loader import eval_loader
from clipit.training.predict import ShardSource, predict
from clipit.training.run_identity import evaluated_changes, evaluation_identity, finished_run
from clipit.training.tb import log_evaluation
from clipit.training.text_side import TextInputs


def evaluate_run(
    cfg: ExperimentConfig,
    method: str,
    run_dir: str | Path,
    split: str = "test",
    warm_start: Path | None = None,
    overwrite: bool = False,
) -> dict:
    """Rebuild the run's model exactly as training did (same warm start: its frozen base weights are not
    in the trainable-only checkpoint), load the selected checkpoint, evaluate.

    Rank 0 holds the run directory's lock while it evaluates and writes (one writer per run directory).
    A non-finite prediction or loss, or an unreadable shard, stops with one line and writes nothing.
    Metrics on disk are reused when the trained run and the evaluated split are the ones requested now
    (run_identity.py); metrics of another split content stop with one line, or are replaced with `overwrite`."""
    run_dir = Path(run_dir)
    metrics_path = layout.metrics_file(run_dir, split)
    run_id = layout.parse_run_dir(run_dir)
    if run_id is not None and layout.is_trained(run_dir):  # the trained run is the one requested now
        finished_run(cfg, method, run_id.seed, run_dir, warm_start)
    if metrics_path.exists() and (current := current_metrics(cfg, method, metrics_path, split, overwrite)):
        return current
    tcfg = cfg.methods[method]
    accelerator = make_accelerator(tcfg)
    with main_process_lock(accelerator, run_dir, "run directory"):
        if metrics_path.exists() and (current := current_metrics(cfg, method, metrics_path, split, overwrite)):
            return current  # written by the previous holder of the lock
        manifest = load_manifest(cfg.shards.dir)
        classes = manifest["classes"]
        # CLIP-IT: the vision model only (a trained text tower shaped the weights but takes no part in the
        # prediction); a method that reads the report at test time (late fusion) keeps its trained tower
        tower = method_spec(tcfg.method).text_at_test and tcfg.text_encoder == "tower"
        model, preprocess = build_model(
            cfg, tcfg, len(classes), manifest["embedding"]["dim"], warm_start, text_tower=tower
        )
        load_model_state(layout.best(run_dir), model, exclude=() if tower else (TEXT_TOWER,))
        model, preprocess = model.to(accelerator.device), preprocess.to(accelerator.device)
        text_inputs = TextInputs(model, tcfg, cfg.shards.dir, manifest, accelerator.device) if tower else None
        source = ShardSource(Path(cfg.shards.dir), split, manifest)
        batch_size, world = 2 * tcfg.batch_size, accelerator.num_processes
        loader = eval_loader(
            source.urls,
            batch_size,
            accelerator.process_index,
            world,
            tcfg.num_workers,
            preprocess.size,
            image=manifest.get("image"),
        )
        # rank 0's share of the batches is only known for one process
        total = math.ceil(manifest["splits"][split]["count"] / batch_size) if world == 1 else None
        loader = progress(
            loader, total=total, desc=f"evaluate {method} on {split}", unit="batch", enabled=accelerator.is_main_process
        )
        out = predict(
            model,
            preprocess,
            loader,
            accelerator,
            tcfg.lam,
            text_inputs,
            what=f"evaluation of {run_dir} on {split}",
            source=source,
            ce_input=tcfg.ce_input,
            hint=f"if the shards are fine, the run's best checkpoint is broken: retrain it "
            f"(`clipit train --config <config> --method {method} --resume none`)",
        )
        metrics = {
            "split": split,
            "method": method,
            **classification_metrics(out["labels"], out["logits"], classes),
            "loss": out["loss"],
            "parameters": count_parameters(model) | extra_inference(cfg, tcfg.method),
            "identity": evaluation_identity(manifest, split),  # what a rerun compares before reusing these
        }
        if accelerator.is_main_process:
            atomic_save_npz(
                layout.predictions_file(run_dir, split),
                keys=np.array(out["keys"]),
                labels=out["labels"],
                logits=out["logits"],
            )
            log_evaluation(run_dir, split, metrics)
            atomic_write_json(metrics_path, metrics)
    return metrics


def current_metrics(cfg: ExperimentConfig, method: str, path: Path, split: str, overwrite: bool) -> dict | None:
    """The metrics on disk when they were computed on the split requested now; None when `overwrite` asks
    to replace metrics of another split content; else one line naming what changed."""
    metrics = read_json(path)
    try:
        manifest = load_manifest(cfg.shards.dir)
    except ClipitError:
        manifest = None  # a gone shard set is evaluation's to report when it has to evaluate
    changes = evaluated_changes(metrics, manifest, split)
    if not changes:
        return metrics
    if overwrite:
        return None
    raise changed_output(
        path,
        f"{method} was evaluated on {split}",
        changes,
        "set output_dir to a new folder",
        f"rerun `clipit evaluate --method {method} --split {split}` with `{OVERWRITE}`",
    )


def extra_inference(cfg: ExperimentConfig, kind: str) -> dict:
    """What else runs at test time: a method fed the retrieved report (its spec's text_at_test) needs the
    pairing CLIP's image encoder for every test image (the corpus' text embeddings are computed once and
    cached)."""
    if not method_spec(kind).text_at_test:
        return {}
    from clipit.pairing.engine import ENCODER_FILE

    path = Path(cfg.pairing.dir) / ENCODER_FILE
    try:
        return {"extra_inference": int(read_json(path)["image_encoder_parameters"]), "extra_inference_from": str(path)}
    except (OSError, ValueError, KeyError, TypeError):
        return {"extra_inference": None}  # pairs made before the file existed: unknown, not zero


def count_parameters(model: torch.nn.Module) -> dict:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    adapters = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    # "inference": the exported model, whose LoRA is merged into the base weights
    counts = {"total": total, "trainable": trainable, "inference": total - adapters}
    cost = getattr(model, "inference_cost", None)  # CLIP baselines: + cached class embeddings, text tower run once
    return counts | cost(counts) if callable(cost) else counts


def summarize(results: dict[str, list[dict]], metric: str = "balanced_accuracy") -> list[dict]:
    """Mean and std over seeds per method: rows for the printed table."""
    rows = []
    for method, runs in results.items():
        values = np.array([r[metric] for r in runs], dtype=float)
        rows.append(
            {
                "method": method,
                "n": len(values),
                "mean": float(values.mean()),
                "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            }
        )
    return rows


def format_table(rows: list[dict], metrics: dict[str, list[dict]]) -> str:
    lines = ["| method | seeds | balanced accuracy | accuracy |", "|---|---|---|---|"]
    for row in rows:
        acc = np.array([r["accuracy"] for r in metrics[row["method"]]])
        acc_std = acc.std(ddof=1) if len(acc) > 1 else 0.0
        lines.append(
            f"| {row['method']} | {row['n']} | {100 * row['mean']:.2f} ± {100 * row['std']:.2f} "
            f"| {100 * acc.mean():.2f} ± {100 * acc_std:.2f} |"
        )
    return "\n".join(lines)
