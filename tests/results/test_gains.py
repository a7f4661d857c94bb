"""The paired gain of CLIP-IT over its warm start (clipit/results/stats.py, comparison.gains_table) pinned on
hand-made numbers: seeds pair by number, the bootstrap is fixed-seed numpy, a single seed has no interval
and no std, and the mean-gain rows average only the cells that have both runs."""

import csv

import numpy as np
import pytest

from clipit.results.comparison import gains_table
from clipit.results.multimodal_tables import multimodal_table
from clipit.results.report import build_report
from clipit.results.runs import find_runs
from clipit.results.stats import bootstrap_interval, verdict
from clipit.results.tables import table1
from clipit_testing import finished_run as make_run


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_bootstrap_is_a_fixed_seed_percentile_interval():
    gains = np.array([0.0, 0.01, 0.05])
    idx = np.random.default_rng(0).integers(0, 3, size=(10_000, 3))  # the documented recipe, spelled out
    expected = tuple(np.percentile(gains[idx].mean(axis=1), [2.5, 97.5]))
    assert bootstrap_interval([gains]) == pytest.approx(expected, abs=0)
    assert bootstrap_interval([gains]) == bootstrap_interval([gains])  # the same runs, the same interval
    # two values: the resampled mean is 0.01, 0.02 or 0.03 (1/4, 1/2, 1/4), so the 95% ends are the values
    assert bootstrap_interval([np.array([0.01, 0.03])]) == pytest.approx((0.01, 0.03))
    assert bootstrap_interval([np.array([0.02, 0.02, 0.02])]) == pytest.approx((0.02, 0.02))


def test_a_single_seed_has_no_interval_and_the_mean_row_resamples_within_cells():
    assert bootstrap_interval([np.array([0.02])]) is None and verdict(None) == "–"
    # no spread within either cell: the mean over cells is exact, however the seeds are resampled
    assert bootstrap_interval([np.array([0.01, 0.01]), np.array([0.03, 0.03, 0.03])]) == pytest.approx((0.02, 0.02))
    # a one-seed cell adds its constant; the other cell's spread is halved by the average over two cells
    assert bootstrap_interval([np.array([0.02]), np.array([0.0, 0.04])]) == pytest.approx((0.01, 0.03))
    assert verdict((0.001, 0.02)) == "gain" and verdict((-0.02, -0.001)) == "loss"
    assert verdict((-0.01, 0.02)) == "within seed noise"


def test_gains_pair_by_seed_and_the_mean_row_counts_only_cells_with_both(tmp_path):
    probe = {0: 0.90, 1: 0.92, 2: 0.91}
    for seed, acc in probe.items():
        make_run(tmp_path, "uni", "crc", "unimodal", "unimodal", seed, acc)
    for seed, acc in {0: 0.93, 1: 0.93}.items():  # seed 2 has no CLIP-IT run: it pairs with nothing
        make_run(tmp_path, "uni", "crc", "clipit", "clipit", seed, acc)
    make_run(tmp_path, "kaiko-vits16", "crc", "unimodal", "unimodal", 0, 0.80)  # probe only
    make_run(tmp_path, "kaiko-vitb8", "crc", "clipit", "clipit", 0, 0.99)  # CLIP-IT only
    make_run(tmp_path, "kaiko-vitb16", "crc", "unimodal", "unimodal", 0, 0.90)  # both, but no common seed
    make_run(tmp_path, "kaiko-vitb16", "crc", "clipit", "clipit", 1, 0.95)
    runs, _ = find_runs(tmp_path)
    _, rows, records = gains_table(runs, "balanced_accuracy")
    cell, mean = records
    assert (cell["backbone"], cell["seeds"], cell["n"]) == ("uni", "0 1", 2)
    assert cell["gain_mean"] == pytest.approx(np.mean([0.03, 0.01]))
    assert cell["gain_std"] == pytest.approx(np.std([0.03, 0.01], ddof=1))
    assert (cell["gain_ci_low"], cell["gain_ci_high"]) == pytest.approx((0.01, 0.03))
    assert mean["backbone"] == "mean gain" and mean["n"] == 1 and mean["gain_mean"] == pytest.approx(0.02)
    assert rows[0] == ["CRC", "UNI", "2", "+2.00 ± 1.41", "[+1.00, +3.00]", "gain"]  # every seed gains
    # Table 1's (unpaired) mean-gain row: only the backbones with both methods, pairs or not
    gain_row = next(r for r in table1(runs, "balanced_accuracy")[2] if r["backbone"] == "mean gain")
    assert gain_row["n_backbones"] == 2
    assert gain_row["delta"] == pytest.approx(np.mean([0.93 - np.mean(list(probe.values())), 0.95 - 0.90]))


def test_one_paired_seed_writes_an_empty_std_and_interval(tmp_path):
    make_run(tmp_path, "uni", "bach", "unimodal", "unimodal", 0, 0.80)
    make_run(tmp_path, "uni", "bach", "clipit", "clipit", 0, 0.83)
    build_report(tmp_path, tmp_path / "report", plots=False)
    cell = next(r for r in read_csv(tmp_path / "report" / "gains.csv") if r["backbone"] == "uni")
    assert cell["gain_std_pct"] == "" and cell["gain_ci_low_pct"] == "" and cell["verdict"] == "–"
    assert float(cell["gain_mean_pct"]) == pytest.approx(3.0)
    assert "| BACH | UNI | 1 | +3.00 (1 seed) | – | – |" in (tmp_path / "report" / "report.md").read_text()


def test_the_text_model_counts_once_per_dataset_and_seed(tmp_path):
    accs = {"bach": {0: 0.70, 1: 0.74}, "crc": {0: 0.60, 1: 0.64, 2: 0.68}}
    for dataset, by_seed in accs.items():
        for backbone in ("uni", "kaiko-vits16", "kaiko-vitb8"):  # one identical copy per backbone
            for seed, acc in by_seed.items():
                make_run(tmp_path, backbone, dataset, "text", "text", seed, acc)
    runs, _ = find_runs(tmp_path)
    _, _, records = multimodal_table(runs, "balanced_accuracy")
    got = {r["dataset"]: r for r in records if r["kind"] == "text"}
    for dataset, by_seed in accs.items():
        values = list(by_seed.values())
        assert got[dataset]["n"] == len(values)
        assert got[dataset]["mean"] == pytest.approx(np.mean(values))
        assert got[dataset]["std"] == pytest.approx(np.std(values, ddof=1))


def test_published_gains_beside_ours_and_their_mean_over_the_same_backbones(tmp_path):
    from clipit.results.references import shipped_references

    six = ["uni", "kaiko-vitl14", "kaiko-vitb16", "kaiko-vits16", "kaiko-vitb8", "kaiko-vits8"]
    for b in six:
        make_run(tmp_path, b, "pcam", "unimodal", "unimodal", 0, 0.90)
        make_run(tmp_path, b, "pcam", "clipit", "clipit", 0, 0.92)
    runs, _ = find_runs(tmp_path)
    refs = shipped_references()
    header, rows, records = gains_table(runs, "balanced_accuracy", refs)
    assert header[-2:] == ["paper-v2 gain", "code-readme gain"]  # eva has no CLIP-IT numbers: no column
    uni = rows[0]
    assert uni[1] == "UNI" and uni[-2:] == ["+1.25", "+1.30"]  # 95.49 - 94.24; README 95.5 - 94.2
    # over all six backbones, Table 1's mean PCAM gain is the paper's sentence: "on average by 2.87%"
    assert rows[-1][-2] == "+2.87" and records[-1]["paper-v2_gain_mean"] == pytest.approx(0.172 / 6)
    assert records[-1]["gain_mean"] == pytest.approx(0.02)
    # a source without one of our backbones: its mean is over the others, and says so
    fewer = [r for r in refs if not (r.source == "paper-v2" and r.backbone == "kaiko-vits8")]
    _, rows, records = gains_table(runs, "balanced_accuracy", fewer)
    assert rows[-1][-2] == "+2.97 (without VITS-8)" and records[-1]["paper-v2_gain_mean"] == pytest.approx(0.1486 / 5)
    assert rows[-2][-2] == "–"  # that backbone's own row
    build_report(tmp_path, tmp_path / "report", plots=False)
    (mean,) = [r for r in read_csv(tmp_path / "report" / "gains.csv") if r["backbone"] == "mean gain"]
    assert float(mean["paper-v2_gain_mean_pct"]) == pytest.approx(17.2 / 6)
    # published numbers are balanced accuracy: another metric gets no reference column
    header, _, _ = gains_table(runs, "accuracy", refs)
    assert not any(h.endswith(" gain") for h in header)
