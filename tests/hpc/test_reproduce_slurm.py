"""`clipit reproduce` on the real local SLURM cluster (slurm/local-cluster.sh): pairing, shard parts and
manifest as arrays, the stage job (afterok) that submits the grid, the frozen-feature job and the report
job (afterany) after it,
a rerun while the chain is queued that submits nothing, and a rerun afterwards that resumes (nothing left
but the report). Skipped unless the cluster answers."""

import json
import shutil
import subprocess

import pytest

from clipit.hpc.reproduce import chain_in_flight
from clipit_testing import ROOT, cli, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.slow]  # ~40 s of SLURM jobs: the slow tier (CI runs it)


@pytest.fixture(scope="module")
def slurm_cluster() -> None:
    if shutil.which("sinfo") is None:
        pytest.skip("SLURM client tools not installed (run: bash slurm/local-cluster.sh start)")
    proc = subprocess.run(
        ["bash", str(ROOT / "slurm" / "local-cluster.sh"), "status"], capture_output=True, text=True, timeout=60
    )
    if proc.returncode != 0:
        pytest.skip("local SLURM cluster not running (bash slurm/local-cluster.sh start)")


def test_the_chain_runs_as_dependent_jobs_and_a_rerun_resumes(slurm_cluster, tiny_shards, tmp_path):
    inputs = [s for s in tiny_shards if not s.startswith(("shards.dir=", "pairing.dir="))]  # built by the chain
    sets = "".join(f"  {s.split('=', 1)[0]}: {s.split('=', 1)[1]}\n" for s in inputs)
    runs = tmp_path / "runs"
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        f"name: chain\nbase: {ROOT / 'configs/demo-tiny.yaml'}\nroot: {runs}\nprofile: local-cluster\nseeds: [0]\n"
        "methods: [unimodal]\nset:\n  output_dir: '{root}/out'\n  pairing.dir: '{root}/pairing'\n"
        "  shards.dir: '{root}/shards'\n  methods.unimodal.epochs: 1\n" + sets + "axes: {v: {main: {}}}\n"
    )
    first = cli("reproduce", "--grid", str(grid), "--num-parts", "2")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    out = first.stdout
    assert "stage 2 prepare: 1 pairing dir(s), 1 shard dir(s)" in out and "part 1/2  (after " in out
    assert "grids, then the report job  (after " in out
    chain = json.loads((runs / "submitit" / "reproduce-chain.json").read_text())["jobs"]
    assert len(chain) == 4  # pairing, parts, manifest, stage job
    again = cli("reproduce", "--grid", str(grid), "--num-parts", "2")  # queued or running: nothing doubles
    assert again.returncode == 0 and "still in flight" in again.stdout, again.stdout[-2000:]
    wait_for(lambda: (runs / "report" / "report.md").is_file(), 600, "the report job")
    state = json.loads((runs / "out" / "runs" / "unimodal" / "seed-0" / "state.json").read_text())
    assert state["state"] == "done" and state["executor"] == "slurm"
    md = (runs / "report" / "report.md").read_text()
    assert (runs / "shards" / "manifest.json").is_file() and "## Table 1" in md
    # the frozen-feature job ran between the grid job and the report job
    assert (runs / "out" / "runs" / "unimodal" / "seed-0" / "frozen_eval.json").is_file()
    assert "## Frozen features: k-NN and few-shot" in md
    wait_for(lambda: not chain_in_flight([str(runs)]), 120, "the report job to leave the queue", interval=2)
    resumed = cli("reproduce", "--grid", str(grid))
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "stage 2 prepare: all 1 shard dir(s) built; skipped" in resumed.stdout
    assert "nothing to submit: cells 1 done" in resumed.stdout and "stage 5 report: 1 run(s)" in resumed.stdout
    assert "stage 4 frozen features: all 1 cell(s) scored for their current training; skipped" in resumed.stdout
