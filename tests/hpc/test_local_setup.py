"""A profile's setup lines under submitit's local executor (`--local`) run under bash as in a SLURM job
script: `source .venv/bin/activate` (the shipped gpu-cluster profile's first line) no longer fails with
"/bin/sh: source: not found", and what the lines export reaches the job."""

import os

import pytest

from clipit.hpc.cluster import load_profile
from clipit.hpc.executor import make_executor
from clipit_testing import ROOT


def test_setup_lines_run_under_bash_and_reach_the_job(tmp_path):
    (tmp_path / "env.sh").write_text("export CLIPIT_SETUP_CHECK='sourced, with spaces and a $dollar'\n")
    profile = load_profile(
        "local-cluster", {"executor": "local", "setup": [f"source {tmp_path / 'env.sh'}", "shopt -s extglob"]}
    )
    executor = make_executor(profile, tmp_path / "logs", "setup-check", "local")
    job = executor.submit(os.getenv, "CLIPIT_SETUP_CHECK")
    assert job.result() == "sourced, with spaces and a $dollar"


def test_a_failing_setup_line_fails_the_job(tmp_path):
    profile = load_profile("local-cluster", {"executor": "local", "setup": [f"source {tmp_path / 'missing.sh'}"]})
    job = make_executor(profile, tmp_path / "logs", "setup-fails", "local").submit(os.getenv, "HOME")
    with pytest.raises(Exception):  # noqa: B017 (submitit's own failure types differ by version)
        job.result()


def test_the_shipped_gpu_cluster_setup_runs_locally(tmp_path, monkeypatch):
    """Its `source .venv/bin/activate` and `export CLIPIT_OFFLINE=1` under --local (from the repository)."""
    if not (ROOT / ".venv" / "bin" / "activate").exists():
        pytest.skip("no .venv here (make venv creates it)")
    monkeypatch.chdir(ROOT)
    profile = load_profile("gpu-cluster", {"executor": "local", "gpus_per_node": 0})
    job = make_executor(profile, tmp_path / "logs", "gpu-profile", "local").submit(os.getenv, "CLIPIT_OFFLINE")
    assert job.result() == "1"
