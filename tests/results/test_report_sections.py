"""`clipit report`'s paper-fidelity sections: multimodal points, Δ against the run a row varies, the LoRA
search chosen on validation, readable labels, header-only CSVs and units (clipit/results/variant_tables.py,
multimodal_tables.py, table_files.py)."""

import csv
import json
from pathlib import Path

import pytest
import yaml

from clipit.results.report import build_report


def run(
    root: Path,
    out: str,
    method: str,
    kind: str,
    seed: int,
    test: float,
    axes: dict,
    params: float,
    extra: float = 0.0,
    val: float | None = None,
    labels: dict | None = None,
    compare: dict | None = None,
) -> Path:
    d = root / out / "runs" / method / f"seed-{seed}"
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(
        yaml.safe_dump(
            {
                "model": {"backbone": axes["backbone"]},
                "data": {"name": axes["dataset"]},
                "methods": {method: {"method": kind}},
            }
        )
    )
    (d / "metrics.json").write_text(
        json.dumps(
            {
                "method": method,
                "balanced_accuracy": test,
                "accuracy": test,
                "parameters": {"total": params, "inference": params, "extra_inference": extra},
            }
        )
    )
    cell = {
        "axes": axes,
        "method": method,
        "seed": seed,
        "kind": kind,
        "axis_labels": labels or {},
        "compare_to": compare or {},
    }
    (d / "state.json").write_text(json.dumps({"state": "done", "cell": cell}))
    if val is not None:
        (d / "train_summary.json").write_text(json.dumps({"best_val": {"balanced_accuracy": val, "loss": 0.3}}))
    return d


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("sections")
    main = {"backbone": "uni", "dataset": "pcam"}
    for seed in range(2):
        run(root, "pcam/uni", "unimodal", "unimodal", seed, 0.90, main, 300e6)
        run(root, "pcam/uni", "clipit", "clipit", seed, 0.92, main | {"lora": "full"}, 300e6, val=0.91)
        run(root, "pcam/uni", "text", "text", seed, 0.70, main, 0.5e6, extra=90e6)
        run(root, "pcam/uni", "late_fusion", "late_fusion", seed, 0.93, main, 300.5e6, extra=90e6)
        # ablations: word-drop-30-remove varies word-drop-30, not the full run
        run(
            root,
            "pcam/abl/wd30",
            "clipit",
            "clipit",
            seed,
            0.95,
            main | {"ablation": "word-drop-30"},
            300e6,
            labels={"ablation": "word drop 30% (masked)"},
        )
        run(
            root,
            "pcam/abl/wd30r",
            "clipit",
            "clipit",
            seed,
            0.94,
            main | {"ablation": "word-drop-30-remove"},
            300e6,
            labels={"ablation": "word drop 30% (removed)"},
            compare={"ablation": "word-drop-30"},
        )
        run(root, "pcam/abl/rank2", "clipit", "clipit", seed, 0.91, main | {"ablation": "report-rank-2"}, 300e6)
        # LoRA search: r8 has the best validation score but not the best test score
        run(
            root,
            "pcam/lora/r8",
            "clipit",
            "clipit",
            seed,
            0.915,
            main | {"lora": "r8-a8"},
            300e6,
            val=0.95,
            labels={"lora": "r 8, alpha 8"},
        )
        run(
            root,
            "pcam/lora/r32",
            "clipit",
            "clipit",
            seed,
            0.96,
            main | {"lora": "r32-a8"},
            300e6,
            val=0.90,
            labels={"lora": "r 32, alpha 8"},
        )
    return root, build_report(root, plots=True)


def test_delta_against_the_run_it_varies(report):
    _, result = report
    rows = {r["variant"]: r for r in result["ablations"]}
    assert rows["word-drop-30-remove"]["compared_to"] == "word-drop-30"
    assert rows["word-drop-30-remove"]["delta_clipit"] == pytest.approx(0.94 - 0.95)
    assert rows["report-rank-2"]["compared_to"] == "full"
    assert rows["report-rank-2"]["delta_clipit"] == pytest.approx(0.91 - 0.92)
    assert "word drop 30% (removed)" in result["markdown"] and "report rank 2" in result["markdown"]
    assert "r8-a8" not in rows  # the LoRA search has its own section


def test_multimodal_rows_count_what_runs_at_test_time(report):
    root, result = report
    rows = {r["kind"]: r for r in result["multimodal"]}
    assert set(rows) == {"text", "late_fusion"}
    assert rows["late_fusion"]["params_inference"] == int(300.5e6 + 90e6)  # + the pairing image encoder
    assert rows["text"]["params_inference"] == int(90.5e6)
    assert (root / "report" / "pareto.png").stat().st_size > 1000


def test_lora_search_is_chosen_on_validation(report):
    root, result = report
    (row,) = result["lora"]
    assert row["chosen"] == "r8-a8" and row["label"] == "r 8, alpha 8" and row["settings"] == 3
    assert row["mean"] == pytest.approx(0.915) and row["val_mean"] == pytest.approx(0.95)
    assert "## LoRA search" in result["markdown"] and "| UNI | PCAM | r 8, alpha 8 | 3 | 95.00 |" in result["markdown"]
    with open(root / "report" / "lora_search.csv") as fh:
        (rec,) = list(csv.DictReader(fh))
    assert float(rec["mean_pct"]) == pytest.approx(91.5) and float(rec["val_mean_pct"]) == pytest.approx(95.0)


def test_empty_tables_are_header_only_files(report, tmp_path):
    root, _ = report
    only_vision = tmp_path / "v"
    run(only_vision, "pcam/uni", "unimodal", "unimodal", 0, 0.9, {"backbone": "uni", "dataset": "pcam"}, 1e6)
    build_report(only_vision, plots=False)
    for name, first in (
        ("omega.csv", "backbone"),
        ("ablations.csv", "backbone"),
        ("multimodal.csv", "dataset"),
        ("lora_search.csv", "backbone"),
    ):
        lines = (only_vision / "report" / name).read_text().splitlines()
        assert len(lines) == 1 and lines[0].startswith(first + ","), (name, lines)
        assert "empty" not in lines[0]
