"""`clipit report`'s frozen-feature table (clipit/results/frozen_table.py) from the frozen_eval.json files
that `clipit evaluate --frozen` leaves in run folders: mean ± std over seeds, a broken file named."""

import csv
import json

import numpy as np
import pytest

from clipit.evaluation.frozen_record import TRAINED
from clipit.io import sha256_file
from clipit.results.report import build_report
from clipit_testing import finished_run


def frozen(run, knn: float, shots: dict):
    """A frozen_eval.json for the run's training (a train_summary.json is written for it to score)."""
    (run / "train_summary.json").write_text(json.dumps({"steps": 10, "wall_s": 1.5}))
    data = {
        TRAINED: sha256_file(run / "train_summary.json"),
        "knn": {"k": 20, "balanced_accuracy": knn},
        "simpleshot": {"shots": {str(n): {"mean": v} for n, v in shots.items()}},
    }
    (run / "frozen_eval.json").write_text(json.dumps(data))


def test_frozen_features_table(tmp_path):
    for seed, (knn, one) in enumerate(((0.80, 0.50), (0.84, 0.60))):
        frozen(finished_run(tmp_path, "uni", "crc", "unimodal", "unimodal", seed, 0.9), knn, {1: one, 16: 0.7})
    frozen(finished_run(tmp_path, "uni", "crc", "clipit", "clipit", 0, 0.93), 0.88, {1: 0.65, 16: 0.75})
    broken = finished_run(tmp_path, "kaiko-vits16", "crc", "unimodal", "unimodal", 0, 0.9)
    (broken / "frozen_eval.json").write_text('{"knn": {}}')
    # scored an earlier training of its folder: the cell was trained again since
    retrained = finished_run(tmp_path, "kaiko-vitb16", "crc", "clipit", "clipit", 0, 0.9)
    frozen(retrained, 0.99, {1: 0.9, 16: 0.99})
    (retrained / "train_summary.json").write_text(json.dumps({"steps": 10, "wall_s": 2.5}))
    warnings = []
    result = build_report(tmp_path, tmp_path / "report", plots=False, warn=warnings.append)
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| CRC | UNI | Unimodal | 2 | 82.00 ± 2.83 | 55.00 ± 7.07 | 70.00 ± 0.00 |" in md
    assert "| CRC | UNI | CLIP-IT | 1 | 88.00 | 65.00 | 75.00 |" in md
    (broken_line,) = [w for w in warnings if w.startswith(str(broken))]
    (stale_line,) = [w for w in warnings if w.startswith(str(retrained))]
    assert broken_line.startswith(str(broken / "frozen_eval.json")) and "clipit evaluate --frozen" in broken_line
    assert stale_line.startswith(str(retrained / "frozen_eval.json")) and "another training" in stale_line
    assert "ViT-B" not in md.split("## Frozen features")[1].split("##")[0]
    with open(tmp_path / "report" / "frozen.csv", newline="") as fh:
        rows = {r["kind"]: r for r in csv.DictReader(fh)}
    assert float(rows["unimodal"]["knn_std_pct"]) == pytest.approx(100 * np.std([0.80, 0.84], ddof=1))
    assert rows["clipit"]["knn_std_pct"] == "" and float(rows["clipit"]["shot16_mean_pct"]) == pytest.approx(75)
    assert len(result["frozen"]) == 2 and r"\toprule" in (tmp_path / "report" / "frozen.tex").read_text()
