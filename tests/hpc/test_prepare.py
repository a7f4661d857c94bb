"""launchers/pair.py and launchers/shards.py: work units from grids, dry runs, and the real
array jobs on the local SLURM cluster (slow)."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clipit.config import ConfigError
from clipit.hpc.prepare import units_from
from clipit.hpc.requests import PrepareRequest
from clipit_testing import ROOT


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(ROOT)


def args(**kw):
    return PrepareRequest(stage="shards", **kw)


def test_grid_units_are_one_per_dataset():
    pairing, shards = units_from(args(grid="configs/grids/paper_table1.yaml"))
    assert [Path(u.dir).parts[-2:] for u in pairing] == [("pcam", "pairing"), ("bach", "pairing"), ("crc", "pairing")]
    assert [Path(u.dir).parts[-2:] for u in shards] == [("pcam", "shards"), ("bach", "shards"), ("crc", "shards")]
    _, shards = units_from(args(grid="configs/grids/paper_ablations.yaml"))
    names = [Path(u.dir).name for u in shards]
    assert names[0] == "shards" and {"shards-rank2", "shards-rank5", "shards-random"} <= set(names)
    assert len({u.pairing_dir for u in shards}) == 1  # every shard set of the ablations shares one pairing


def test_one_dir_with_two_settings_is_an_error(tmp_path):
    grid = tmp_path / "g.yaml"
    grid.write_text(
        f"name: x\nbase: {ROOT / 'configs/demo-tiny.yaml'}\nroot: {tmp_path}\n"
        "set: {output_dir: '{root}/{v}', shards.dir: /tmp/same-shards}\n"
        "axes: {v: {a: {set: {shards.use_rank: 1}}, b: {set: {shards.use_rank: 2}}}}\n"
    )
    with pytest.raises(ConfigError, match="different data/reports/pairing/shards settings"):
        units_from(args(grid=str(grid)))


def test_dry_runs_print_the_commands():
    proc = subprocess.run(
        [
            sys.executable,
            "launchers/shards.py",
            "--grid",
            "configs/grids/paper_table1.yaml",
            "--pair",
            "--num-parts",
            "8",
            "--dry-run",
            "--no-preflight",  # no data here: tests/hpc/test_preflight.py has the refusal
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("clipit shard build --config") == 3 and "--part $I --num-parts 8" in proc.stdout
    assert "pairing dirs: 3" in proc.stdout
    proc = subprocess.run(
        [sys.executable, "launchers/pair.py", "--config", "configs/demo-tiny.yaml", "--dry-run"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "clipit pair --config" in proc.stdout, proc.stderr


# ------------------------------------------------------------------------------------- SLURM


def cluster_or_skip():
    import shutil

    if shutil.which("sinfo") is None:
        pytest.skip("SLURM client tools not installed (run: bash slurm/local-cluster.sh start)")
    proc = subprocess.run(
        ["bash", str(ROOT / "slurm/local-cluster.sh"), "status"], capture_output=True, text=True, timeout=60
    )
    if proc.returncode != 0:
        pytest.skip("local SLURM cluster not running (bash slurm/local-cluster.sh start)")


@pytest.mark.slurm
@pytest.mark.slow
def test_pairing_then_shard_parts_then_manifest_on_slurm(tmp_path):
    cluster_or_skip()
    proc = subprocess.run(
        [
            sys.executable,
            "launchers/shards.py",
            "--config",
            "configs/demo-tiny.yaml",
            "--set",
            f"output_dir={tmp_path}",
            "--set",
            "data.demo.clip_seconds=3",
            "--pair",
            "--num-parts",
            "3",
            "--profile",
            "local-cluster",
            "--wait",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    jobs = re.findall(r"^job (\S+)\s+(.*)$", proc.stdout, re.M)
    assert [label.split("  ")[0] for _, label in jobs][1:] == [
        "part 0/3",
        "part 1/3",
        "part 2/3",
        "finalize (manifest)",
    ]
    assert "(after" in jobs[1][1] and "(after" in jobs[-1][1]  # parts wait for pairing, finalize for parts
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["count"] == 256
    check = subprocess.run(
        [sys.executable, "-m", "clipit", "shard", "validate", str(tmp_path / "shards")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert check.returncode == 0 and check.stdout.startswith("ok: "), check.stderr


@pytest.mark.slurm
@pytest.mark.slow
def test_multinode_sbatch_runs_a_process_group_and_requeues_on_usr1(tiny_shards, tmp_path):
    """slurm/multinode.sbatch on the one-node cluster: torchrun with 2 CPU processes (the accelerate
    launcher needs GPUs); USR1 to the batch shell requeues, and the run resumes from its checkpoint."""
    cluster_or_skip()
    sets = [
        f"output_dir={tmp_path / 'run'}",
        *tiny_shards,
        "methods.clipit.warm_start=null",
        "methods.clipit.epochs=4",
        "methods.clipit.checkpoint_every=2",
    ]
    env = os.environ | {"LAUNCHER": "torchrun", "NPROC_PER_NODE": "2", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--nodes=1",
            "--gpus-per-node=0",
            "--cpus-per-task=2",
            f"--output={tmp_path}/job-%j.out",
            "slurm/multinode.sbatch",
            "configs/demo-tiny.yaml",
            "clipit",
            "--",
            *[a for s in sets for a in ("--set", s)],
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip().split(";")[0]
    try:
        check_multinode_job(job, tmp_path)
    finally:
        subprocess.run(["scancel", job], capture_output=True, timeout=30)


def check_multinode_job(job: str, tmp_path: Path) -> None:
    run = tmp_path / "run" / "runs" / "clipit" / "seed-0"
    deadline = time.monotonic() + 60
    while not (run / "checkpoints" / "latest" / "progress.json").exists():
        assert time.monotonic() < deadline, (tmp_path / f"job-{job}.out").read_text()[-3000:]
        time.sleep(0.3)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True, timeout=30)
    deadline = time.monotonic() + 100
    while not (run / "metrics.json").exists():
        assert time.monotonic() < deadline, (tmp_path / f"job-{job}.out").read_text()[-3000:]
        time.sleep(0.5)
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["resumed_from_step"] >= 1, summary
    log = (tmp_path / f"job-{job}.out").read_text()
    assert "USR1: time limit near, requeueing" in log and "restart 1" in log
