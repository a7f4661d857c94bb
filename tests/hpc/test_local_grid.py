"""`launchers/grid.py --local` (submitit's local executor) end to end, then `clipit report` on it."""

import json
import subprocess
import sys

import pytest

from clipit_testing import ROOT


@pytest.mark.slow
def test_local_grid_with_a_reused_warm_start_then_report(tiny_shards, tmp_path):
    sets = "\n".join(f"  {s.split('=', 1)[0]}: {s.split('=', 1)[1]}" for s in tiny_shards)
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"""name: local
base: {ROOT / "configs/demo-tiny.yaml"}
root: {tmp_path / "runs"}
profile: local-cluster
seeds: [0]
set:
  output_dir: "{{root}}/{{variant}}"
{sets}
  methods.unimodal.epochs: 1
  methods.clipit.epochs: 1
  methods.text: {{method: text, epochs: 1, select: val_bacc, augment: false}}
axes:
  variant:
    full: {{methods: [unimodal, clipit, text]}}
    lam0: {{set: {{methods.clipit.lam: 0.0}}, methods: [clipit], warm_start_from: full}}
""")
    proc = subprocess.run(
        [sys.executable, "launchers/grid.py", "--config", str(grid), "--local"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "local run finished: 2 tasks ok, 0 failed" in proc.stdout
    runs = tmp_path / "runs"
    for path in (
        "full/runs/unimodal/seed-0",
        "full/runs/clipit/seed-0",
        "full/runs/text/seed-0",
        "lam0/runs/clipit/seed-0",
    ):
        state = json.loads((runs / path / "state.json").read_text())
        assert state["state"] == "done" and state["executor"] == "local", path
    assert (runs / "lam0/runs/unimodal/seed-0").is_symlink()
    again = subprocess.run(
        [sys.executable, "launchers/grid.py", "--config", str(grid), "--local"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0 and "nothing to submit: cells 4 done" in again.stdout
    report = subprocess.run(
        [sys.executable, "-m", "clipit", "report", str(runs)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert report.returncode == 0, report.stderr[-2000:]
    md = (runs / "report" / "report.md").read_text()
    assert "## Table 1" in md and "lam0" in md and "Ω" in md
    assert (runs / "report" / "omega.png").exists() and (runs / "report" / "curves-demo.png").exists()
