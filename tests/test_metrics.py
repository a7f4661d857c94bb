"""Balanced accuracy (clipit/metrics.py) by hand: unbalanced classes and a class absent from the labels."""

import numpy as np
import pytest

from clipit.metrics import classification_metrics


def one_hot(preds, n):
    return np.eye(n)[np.asarray(preds)]


def test_balanced_accuracy_on_unbalanced_classes():
    # class 0: 8 samples, 6 right; class 1: 2 samples, 1 right -> recall 0.75 and 0.5
    labels = [0] * 8 + [1] * 2
    preds = [0] * 6 + [1] * 2 + [1, 0]
    m = classification_metrics(np.array(labels), one_hot(preds, 2), ["a", "b"])
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["balanced_accuracy"] == pytest.approx((0.75 + 0.5) / 2)
    assert m["per_class_recall"] == {"a": pytest.approx(0.75), "b": pytest.approx(0.5)}
    assert m["confusion"] == [[6, 2], [1, 1]]


def test_a_class_missing_from_the_labels_is_left_out_of_the_mean():
    # 3 classes, no sample of class 2 (but predicted once): the mean runs over classes 0 and 1 only
    labels = [0, 0, 0, 1, 1]
    preds = [0, 0, 2, 1, 0]
    m = classification_metrics(np.array(labels), one_hot(preds, 3), ["a", "b", "c"])
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert m["per_class_recall"]["c"] == 0.0 and m["confusion"][2] == [0, 0, 0]
    assert m["accuracy"] == pytest.approx(3 / 5)
