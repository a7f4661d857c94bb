"""Broken run files in `clipit report` and `clipit grid`: a run is never silently dropped or
mislabelled; it is left out with a warning naming the file, and a cell whose state cannot be read is
*unknown* (not resubmitted), never *new*."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from clipit.hpc.grid import expand
from clipit_testing import ROOT, cli

GRID = "configs/grids/demo.yaml"


def make_run(
    root: Path,
    method: str,
    seed: int,
    acc: float,
    kind: str | None = None,
    backbone: str = "uni",
    dataset: str = "pcam",
) -> Path:
    run = root / dataset / backbone / "runs" / method / f"seed-{seed}"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(
        yaml.safe_dump(
            {
                "model": {"backbone": backbone},
                "data": {"name": dataset},
                "methods": {method: {"method": kind or method}},
            }
        )
    )
    (run / "metrics.json").write_text(json.dumps({"method": method, "balanced_accuracy": acc, "accuracy": acc}))
    labels = np.arange(20) % 2
    pred = labels if kind == "text" else np.where(np.arange(20) < 15, labels, 1 - labels)
    np.savez(
        run / "predictions-test.npz",
        keys=np.array([f"k{i}" for i in range(20)]),
        labels=labels,
        logits=np.stack([pred == 0, pred == 1], 1).astype(np.float32),
    )
    return run


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "grid"
    for seed in (0, 1):
        make_run(root, "unimodal", seed, 0.80 + 0.01 * seed)
        make_run(root, "clipit", seed, 0.85 + 0.01 * seed)
        make_run(root, "text", seed, 0.6, kind="text")
    return root


def report(root: Path, *extra: str):
    proc = cli("report", str(root), "--no-plots", *extra)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    warnings = [line.removeprefix("clipit: warning: ") for line in proc.stderr.splitlines()]
    assert all(line.startswith("clipit: warning: ") for line in proc.stderr.splitlines()), proc.stderr
    with open(root / "report" / "runs.csv") as fh:
        listed = {row["run_dir"] for row in csv.DictReader(fh)}
    return warnings, listed, (root / "report" / "report.md").read_text()


@pytest.mark.parametrize(
    "content,why",
    [
        (b'{"balanced_accuracy": 0.9, "accuracy":', "not valid JSON"),
        (b"[0.9, 0.9]", "holds a JSON list, not an object"),
        (b'{"method": "clipit", "accuracy": 0.9}', "balanced_accuracy is None, not a finite number"),
        (b'{"balanced_accuracy": NaN, "accuracy": 0.9}', "balanced_accuracy is nan, not a finite number"),
        (b'{"balanced_accuracy": "0.9", "accuracy": 0.9}', "balanced_accuracy is '0.9', not a finite number"),
        ('{"balanced_accuracy": 0.9, "accuracy": 0.9, "note": "b\xe9"}'.encode("latin-1"), "not UTF-8 text"),
    ],
)
def test_malformed_metrics_leave_the_run_out_with_a_warning(runs, content, why):
    bad = runs / "pcam" / "uni" / "runs" / "clipit" / "seed-1"
    (bad / "metrics.json").write_bytes(content)
    warnings, listed, md = report(runs)
    assert len(warnings) == 1 and warnings[0].startswith(f"{bad / 'metrics.json'}: {why}"), warnings
    assert "run left out of the report" in warnings[0]
    assert str(bad) not in listed and len(listed) == 5
    assert "## Left out" in md and str(bad / "metrics.json") in md
    assert "| UNI | 80.50 ± 0.71 | 85.00 (1 seed) |" in md  # the other CLIP-IT seed, alone and said so


@pytest.mark.parametrize(
    "name,content,why",
    [
        ("state.json", "{not json", "not valid JSON"),
        ("state.json", '{"cell": {"seed": "zero"}}', "unexpected content"),
        ("config.yaml", "model: [unclosed", "not valid YAML"),
        ("config.yaml", "- a list\n", "holds a YAML list"),
    ],
)
def test_unreadable_labels_leave_the_run_out_instead_of_guessing(runs, name, content, why):
    """Without its state.json axes (or config.yaml), an ablation run would land in Table 1 as a main run."""
    bad = runs / "pcam" / "uni" / "runs" / "unimodal" / "seed-0"
    (bad / name).write_text(content)
    warnings, listed, md = report(runs)
    assert len(warnings) == 1 and warnings[0].startswith(f"{bad / name}: {why}"), warnings
    assert str(bad) not in listed and str(bad / name) in md


def test_unreadable_state_of_a_cell_without_results_is_named(runs):
    cell = runs / "pcam" / "uni-ablations" / "no-text" / "runs" / "clipit" / "seed-0"
    cell.mkdir(parents=True)
    (cell / "state.json").write_text('{"state": "running", "job_id": ')
    warnings, listed, md = report(runs)
    assert warnings == [
        f"{cell / 'state.json'}: not valid JSON (Expecting value at line 1); cell left out of the "
        "grid status (`clipit grid` treats it as unknown)"
    ]
    assert len(listed) == 6


def test_broken_predictions_leave_only_that_omega_seed_out(runs):
    bad = runs / "pcam" / "uni" / "runs" / "text" / "seed-1" / "predictions-test.npz"
    bad.write_bytes(b"PK\x03\x04 not a zip")
    warnings, listed, md = report(runs)
    assert len(warnings) == 1 and warnings[0].startswith(
        f"Ω of uni on pcam, seed 1 left out: {bad}: unreadable predictions"
    ), warnings
    assert len(listed) == 6  # the run itself still counts in the tables
    assert "| UNI | PCAM | 25.00 (1 seed) | 1 | 20 |" in md


def test_empty_folder_is_an_empty_report_that_says_so(tmp_path):
    (tmp_path / "nothing-here").mkdir()
    warnings, listed, md = report(tmp_path / "nothing-here")
    assert warnings == [
        f"{tmp_path / 'nothing-here'}: no finished runs found (no readable metrics.json below it); the report is empty"
    ]
    assert not listed and "No finished runs were found under" in md


def test_missing_folder_is_one_error_line(tmp_path):
    proc = cli("report", str(tmp_path / "nope"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [
        f"clipit: error: {tmp_path / 'nope'}: no such directory; give the folder that "
        "holds the runs (e.g. runs/grids/NAME)"
    ]


# --------------------------------------------------------------------------------------------- the ledger


def dry_run(root: Path, *extra: str):
    proc = cli("grid", "--config", GRID, "--root", str(root), "--dry-run", "--no-preflight", *extra)  # no shards here
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stdout.splitlines()


@pytest.mark.parametrize(
    "content,why",
    [
        ('{"state": "running", "job_id": "41_0", "exec', "not valid JSON (Unterminated string"),
        pytest.param("[1, 2]", "holds a JSON list, not an object", marks=pytest.mark.slow),
        pytest.param('{"state": "queued?", "job_id": "41_0"}', "unknown state 'queued?'", marks=pytest.mark.slow),
    ],
)
def test_unreadable_state_is_unknown_not_new(tmp_path, content, why):
    """A live task whose state.json cannot be read must not be submitted a second time."""
    root = tmp_path / "grid"
    plan = expand(ROOT / GRID, root=str(root))
    task = plan.tasks[0]
    state = Path(task.cells[0].run_dir) / "state.json"
    state.parent.mkdir(parents=True)
    state.write_text(content)
    lines = dry_run(root)
    assert f"task 0 [skip] {task.label}" in lines, lines
    note = next(line for line in lines if line.startswith(f"not resubmitted: {task.label} ("))
    assert note.startswith(f"not resubmitted: {task.label} (state unknown: {state}: {why}"), note
    assert note.endswith("a task may still be running it (--force-unknown resubmits))")
    assert any(
        line.strip().startswith(f"{task.cells[0].method}") and " unknown " in line and "(state.json unreadable)" in line
        for line in lines
    ), lines
    assert f"task 0 [submit] {task.label}" in dry_run(root, "--force-unknown")
