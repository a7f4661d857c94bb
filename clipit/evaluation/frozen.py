"""`clipit evaluate --frozen`: how good a trained run's backbone is as a frozen feature extractor, with no
head: k-NN (cosine, k = 20, as eva and THUNDER) and few-shot SimpleShot (1-16 shots per class, several
episodes), each with the train split as the labelled set and the test split as the queries.

The train features come through the feature cache (clipit/training/features.py: one cache per backbone
state, so the unimodal run shares its probe's cache and CLIP-IT's tuned backbone gets its own); the test
split, which the cache does not hold, is encoded here. Writes `frozen_eval.json` into the run folder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from clipit import layout
from clipit.config import ExperimentConfig
from clipit.errors import ClipitError
from clipit.evaluation.frozen_record import TRAINED, current_record, training_stamp
from clipit.io import atomic_write_json
from clipit.methods import method_spec
from clipit.metrics import classification_metrics
from clipit.models.checkpoint import TEXT_TOWER, load_model_state
from clipit.models.factory import build_model
from clipit.shards.manifest import load_manifest
from clipit.training.accel import make_accelerator
from clipit.training.feature_files import load_split
from clipit.training.features import ensure_cache
from clipit.training.loader import eval_loader
from clipit.training.predict import ShardSource

KNN_K = 20
SHOTS = (1, 2, 4, 8, 16)
EPISODES = 100
SEED = 0  # the episodes' sampling: the same features give the same numbers


class FrozenEvalError(ClipitError):
    """A run whose backbone cannot be evaluated frozen (no vision model)."""


def balanced_accuracy(labels: np.ndarray, preds: np.ndarray, n_classes: int) -> float:
    return classification_metrics(labels, np.eye(n_classes)[preds], [str(c) for c in range(n_classes)])[
        "balanced_accuracy"
    ]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn_predict(
    index_x: np.ndarray, index_y: np.ndarray, query_x: np.ndarray, n_classes: int, k: int = KNN_K
) -> np.ndarray:
    """Majority vote of the k most cosine-similar labelled samples; a tie goes to the class whose
    voters are more similar in sum."""
    index, k = _unit(index_x.astype(np.float32)), min(k, len(index_x))
    preds = []
    for start in range(0, len(query_x), 4096):  # bounded memory: a block of queries at a time
        sims = _unit(query_x[start : start + 4096].astype(np.float32)) @ index.T
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        votes = np.zeros((len(sims), n_classes))
        weight = np.zeros((len(sims), n_classes))
        rows = np.arange(len(sims))[:, None]
        np.add.at(votes, (rows, index_y[top]), 1.0)
        np.add.at(weight, (rows, index_y[top]), sims[rows, top])
        # |summed similarity| <= k, so weight / (2k + 1) moves a score by under 1/2: it only breaks ties
        preds.append(np.argmax(votes + weight / (2 * k + 1), axis=1))
    return np.concatenate(preds) if preds else np.zeros(0, dtype=np.int64)


def simpleshot(
    train_x: np.ndarray,
    train_y: np.ndarray,
    query_x: np.ndarray,
    query_y: np.ndarray,
    n_classes: int,
    shots: int,
    episodes: int = EPISODES,
    seed: int = SEED,
) -> list[float]:
    """Balanced accuracy per episode of SimpleShot (CL2N): `shots` labelled samples per class drawn from
    train, every feature centred by the support set's mean and L2-normalised, each query given the class
    of the nearest class mean. A class with fewer samples than `shots` uses all it has."""
    rng = np.random.default_rng([seed, shots])
    by_class = [np.flatnonzero(train_y == c) for c in range(n_classes)]
    results = []
    for _ in range(episodes):
        support = [rng.choice(idx, size=min(shots, len(idx)), replace=False) for idx in by_class if len(idx)]
        labels = [c for c, idx in enumerate(by_class) if len(idx)]
        mean = train_x[np.concatenate(support)].mean(axis=0)
        protos = _unit(np.stack([train_x[s].mean(axis=0) for s in support]) - mean)
        queries = _unit(query_x - mean)
        nearest = np.argmax(queries @ protos.T, axis=1)  # unit vectors: the nearest is the most similar
        results.append(balanced_accuracy(query_y, np.asarray(labels)[nearest], n_classes))
    return results


def _test_features(cfg, tcfg, model, preprocess, manifest, accelerator) -> tuple[np.ndarray, np.ndarray]:
    source = ShardSource(Path(cfg.shards.dir), "test", manifest)
    loader = eval_loader(
        source.urls,
        2 * tcfg.batch_size,
        num_workers=tcfg.num_workers,
        load_size=preprocess.size,
        image=manifest.get("image"),
    )
    feats, labels = [], []
    with torch.no_grad():
        for batch in source.batches(loader, "the frozen evaluation's test features"):
            with accelerator.autocast():
                out = model.features(preprocess(batch["images"].to(accelerator.device)))
            feats.append(out.float().cpu().numpy())
            labels.append(batch["labels"].numpy())
    return np.concatenate(feats), np.concatenate(labels)


def frozen_eval_run(cfg: ExperimentConfig, method: str, run_dir: str | Path, warm_start: Path | None = None) -> dict:
    """k-NN and SimpleShot on the run's backbone (its selected checkpoint), written to frozen_eval.json
    (skipped when written already for the run's current training, clipit/evaluation/frozen_record.py)."""
    run_dir = Path(run_dir)
    out_path = layout.frozen_eval_file(run_dir)
    done = current_record(run_dir)
    if done is not None:
        return done
    tcfg = cfg.methods[method]
    if method_spec(tcfg.method).vision is None:
        raise FrozenEvalError(f"methods.{method}: a {tcfg.method} model has no vision backbone to evaluate frozen")
    accelerator = make_accelerator(tcfg)
    manifest = load_manifest(cfg.shards.dir)
    n_classes = len(manifest["classes"])
    model, preprocess = build_model(cfg, tcfg, n_classes, manifest["embedding"]["dim"], warm_start, text_tower=False)
    if not callable(getattr(model, "features", None)):
        raise FrozenEvalError(f"methods.{method}: the {tcfg.method} model has no features() hook (models/*.py)")
    load_model_state(layout.best(run_dir), model, exclude=(TEXT_TOWER,))
    model.eval()
    with torch.no_grad():  # a tuned backbone has trainable weights: no graph for features never trained on
        cache_dir, cache_manifest, _ = ensure_cache(accelerator, cfg, tcfg, model, preprocess, manifest)
    train = load_split(cache_dir, cache_manifest, "train", "cpu")
    train_x, train_y = train.features.float().numpy(), train.labels.numpy()
    model, preprocess = model.to(accelerator.device), preprocess.to(accelerator.device)
    test_x, test_y = _test_features(cfg, tcfg, model, preprocess, manifest, accelerator)
    knn = balanced_accuracy(test_y, knn_predict(train_x, train_y, test_x, n_classes), n_classes)
    shots = {}
    for n in SHOTS:
        values = simpleshot(train_x, train_y, test_x, test_y, n_classes, n)
        shots[str(n)] = {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)), "episodes": len(values)}
    result = {
        TRAINED: training_stamp(run_dir),
        "method": method,
        "index_split": "train",
        "query_split": "test",
        "n_index": int(len(train_y)),
        "n_query": int(len(test_y)),
        "feature_dim": int(train_x.shape[1]),
        "feature_cache": str(cache_dir),
        "knn": {"k": KNN_K, "similarity": "cosine", "balanced_accuracy": knn},
        "simpleshot": {"normalisation": "CL2N", "seed": SEED, "shots": shots},
    }
    if accelerator.is_main_process:
        atomic_write_json(out_path, result)
    return result
