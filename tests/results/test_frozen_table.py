"""`clipit report`'s frozen-feature table (clipit/results/frozen_table.py) from the frozen_eval.json files
that `clipit evaluate --frozen` leaves in run folders: mean ± std over seeds, a broken file named."""

import csv
import json

import numpy as np
import pytest

from clipit.results.report import build_report
from clipit_testing import finished_run


def frozen(run, knn: float, shots: dict):
    data = {
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
    warnings = []
    result = build_report(tmp_path, tmp_path / "report", plots=False, warn=warnings.append)
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| CRC | UNI | Unimodal | 2 | 82.00 ± 2.83 | 55.00 ± 7.07 | 70.00 ± 0.00 |" in md
    assert "| CRC | UNI | CLIP-IT | 1 | 88.00 | 65.00 | 75.00 |" in md
    (line,) = [w for w in warnings if "frozen_eval.json" in w]
    assert line.startswith(str(broken / "frozen_eval.json")) and "clipit evaluate --frozen" in line
    with open(tmp_path / "report" / "frozen.csv", newline="") as fh:
        rows = {r["kind"]: r for r in csv.DictReader(fh)}
    assert float(rows["unimodal"]["knn_std_pct"]) == pytest.approx(100 * np.std([0.80, 0.84], ddof=1))
    assert rows["clipit"]["knn_std_pct"] == "" and float(rows["clipit"]["shot16_mean_pct"]) == pytest.approx(75)
    assert len(result["frozen"]) == 2 and r"\toprule" in (tmp_path / "report" / "frozen.tex").read_text()
