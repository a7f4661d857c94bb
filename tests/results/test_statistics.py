"""The report's statistics pinned on hand-made numbers: a seed counts once (the text model trained once per
backbone of a grid; a run folder claimed twice), single-seed rows have no std (an empty CSV cell), and a
non-finite parameter count leaves its run out with one warning line."""

import csv
import json

import numpy as np
import pytest

from clipit.results.multimodal_tables import text_table
from clipit.results.report import build_report
from clipit.results.runs import find_runs
from clipit.results.tables import table1
from clipit_testing import finished_run as make_run


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_text_model_copies_count_each_seed_once(tmp_path):
    accs = {0: 0.70, 1: 0.74, 2: 0.66}
    for backbone in ("uni", "kaiko-vits16", "kaiko-vitb8"):  # three identical copies per seed
        for seed, acc in accs.items():
            make_run(tmp_path, backbone, "bach", "text", "text", seed, acc)
    runs, _ = find_runs(tmp_path)
    ((dataset, n, cell),) = text_table(runs, "balanced_accuracy")
    std = np.std(list(accs.values()), ddof=1)
    assert n == "3" and cell == f"{100 * np.mean(list(accs.values())):.2f} ± {100 * std:.2f}"


def test_a_single_seed_has_no_std_in_markdown_or_csv(tmp_path):
    make_run(tmp_path, "uni", "crc", "unimodal", "unimodal", 0, 0.9)
    make_run(tmp_path, "uni", "crc", "clipit", "clipit", 0, 0.93)
    make_run(tmp_path, "uni", "crc", "clipit", "clipit", 1, 0.95)
    runs, _ = find_runs(tmp_path)
    _, rows, records = table1(runs, "balanced_accuracy")
    assert rows[0][1] == "90.00 (1 seed)" and rows[0][2] == "94.00 ± 1.41"
    assert records[0]["unimodal_std"] is None and records[0]["clipit_std"] == pytest.approx(
        np.std([0.93, 0.95], ddof=1)
    )
    out = build_report(tmp_path, tmp_path / "report", metric="balanced_accuracy", plots=False)
    csv_files = [p for p in (tmp_path / "report").glob("*.csv") if "table1" in p.name]
    assert csv_files, out
    row = next(r for r in read_csv(csv_files[0]) if r["backbone"] == "uni")
    assert row["unimodal_std_pct"] == "" and row["unimodal_n"] == "1"
    assert float(row["clipit_std_pct"]) == pytest.approx(100 * np.std([0.93, 0.95], ddof=1))


def test_a_run_claimed_twice_counts_once_and_is_named(tmp_path):
    make_run(tmp_path / "a", "uni", "crc", "clipit", "clipit", 0, 0.90)
    make_run(tmp_path / "a", "uni", "crc", "clipit", "clipit", 1, 0.94)
    make_run(tmp_path / "b", "uni", "crc", "clipit", "clipit", 1, 0.94)  # the same cell and seed, copied
    warnings = []
    runs, _ = find_runs(tmp_path, warn=warnings.append)
    assert sorted(r.seed for r in runs) == [0, 1]
    (line,) = warnings
    assert line.startswith(str(tmp_path / "b")) and "claims the same cell and seed as" in line
    assert str(tmp_path / "a") in line and "counts once" in line


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -5, "many"])
def test_a_non_finite_parameter_count_leaves_the_run_out_with_one_line(tmp_path, value):
    run = make_run(tmp_path, "uni", "crc", "clipit", "clipit", 0, 0.9)
    metrics_path = run / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    metrics["parameters"]["total"] = value
    metrics_path.write_text(json.dumps(metrics))
    warnings = []
    runs, _ = find_runs(tmp_path, warn=warnings.append)
    assert runs == [] and len(warnings) == 1
    assert (
        warnings[0].startswith(f"{metrics_path}: parameters.total is ") and "not a count of parameters" in warnings[0]
    )
