"""Classification metrics. "Accuracy" in the paper's tables is balanced accuracy (macro recall)."""

from __future__ import annotations

import numpy as np


def confusion(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(labels), np.asarray(preds)), 1)
    return matrix


def classification_metrics(labels: np.ndarray, logits: np.ndarray, classes: list[str]) -> dict:
    preds = np.asarray(logits).argmax(axis=1)
    matrix = confusion(labels, preds, len(classes))
    support = matrix.sum(axis=1)
    recall = np.divide(np.diag(matrix), support, out=np.zeros(len(classes)), where=support > 0)
    return {
        "n": int(len(labels)),
        "accuracy": float((preds == np.asarray(labels)).mean()) if len(labels) else 0.0,
        "balanced_accuracy": float(recall[support > 0].mean()) if support.any() else 0.0,
        "per_class_recall": {c: float(r) for c, r in zip(classes, recall)},
        "confusion": matrix.tolist(),
    }
