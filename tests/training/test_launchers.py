"""`accelerate launch` as users type it: the shipped CPU config starts 2 real processes, and a launch
that silently falls back to one process is refused with one line."""

import json
from pathlib import Path

import pytest

from clipit.config import ConfigError, TrainConfig
from clipit.training.accel import check_precision, requested_precision, requested_processes
from clipit_testing import ROOT, TINY, TORCHRUN_2, cli, run_clipit

PROBE = ["methods.unimodal.epochs=1", "methods.unimodal.batch_size=32"]


def accelerate(*args, shards, out, timeout=600):
    import subprocess
    import sys

    sets = [a for s in [f"output_dir={out}", *shards, *PROBE] for a in ("--set", s)]
    launcher = str(Path(sys.executable).parent / "accelerate")  # the console script users type
    cmd = [
        launcher,
        "launch",
        *args,
        "-m",
        "clipit",
        "train",
        "--config",
        TINY,
        "--method",
        "unimodal",
        "--seed",
        "0",
        *sets,
    ]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_requested_processes_reads_the_launch_line(tmp_path):
    config = tmp_path / "a.yaml"
    config.write_text("num_processes: 3\n")
    launch = ["/venv/bin/python", "/venv/bin/accelerate", "launch"]
    assert requested_processes([*launch, "--num_processes", "2", "--cpu", "-m", "clipit", "train"]) == 2
    assert requested_processes([*launch, "--num_processes=4", "x.py"]) == 4
    assert requested_processes(["python", "-m", "accelerate.commands.launch", "--num_processes", "2", "x.py"]) == 2
    assert requested_processes([*launch, "--config_file", str(config), "-m", "clipit"]) == 3
    assert requested_processes(["/usr/bin/python", "-m", "torch.distributed.run", "--nproc_per_node", "2"]) is None
    # flags after -m belong to clipit, not to the launcher
    assert requested_processes([*launch, "-m", "clipit", "train", "--num_processes", "5"]) is None


@pytest.mark.multiproc
def test_shipped_cpu_config_runs_two_processes(tmp_path, tiny_shards):
    out = tmp_path / "out"
    proc = accelerate("--config_file", "configs/accelerate/cpu.yaml", shards=tiny_shards, out=out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "runs" / "unimodal" / "seed-0" / "train_summary.json").read_text())
    assert summary["world_size"] == 2
    assert "world size 2, backend gloo" in proc.stdout
    assert proc.stdout.count("unimodal seed 0: balanced accuracy") == 1  # rank 0 only


@pytest.mark.multiproc
def test_silent_single_process_fallback_is_refused(tmp_path, tiny_shards):
    out = tmp_path / "out"
    proc = accelerate("--num_processes", "2", "--cpu", shards=tiny_shards, out=out)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("clipit: error:")]
    # accelerate itself prints a traceback of its CalledProcessError (exit 2 of its child); clipit none
    assert proc.returncode != 0 and len(errors) == 1 and f'File "{ROOT / "clipit"}' not in proc.stderr
    assert "returned non-zero exit status 2" in proc.stderr
    assert "asked for 2 processes but started 1" in errors[0] and "configs/accelerate/cpu.yaml" in errors[0]
    assert not (out / "runs" / "unimodal" / "seed-0" / "train_summary.json").exists()


def test_requested_precision_reads_the_flag_over_the_config_file(tmp_path):
    config = tmp_path / "a.yaml"
    config.write_text("num_processes: 1\nmixed_precision: fp16\n")
    launch = ["/venv/bin/python", "/venv/bin/accelerate", "launch"]
    assert requested_precision([*launch, "--mixed_precision", "bf16", "-m", "clipit"]) == "bf16"
    assert requested_precision([*launch, "--config_file", str(config), "-m", "clipit"]) == "fp16"
    assert requested_precision([*launch, "--config_file", str(config), "--mixed_precision=no", "x.py"]) == "no"
    assert requested_precision([*launch, "--num_processes", "2", "-m", "clipit", "--mixed_precision", "bf16"]) is None
    assert requested_precision(["python", "-m", "torch.distributed.run", "--mixed_precision", "bf16"]) is None
    check_precision(TrainConfig(precision="bf16"), "bf16")
    check_precision(TrainConfig(precision="fp32"), "no")
    with pytest.raises(ConfigError, match=r"asks for mixed precision 'bf16', but the config trains in fp32"):
        check_precision(TrainConfig(precision="fp32"), "bf16")


def test_a_launch_line_precision_that_disagrees_is_refused_not_ignored(tmp_path, tiny_shards):
    """`accelerate launch --mixed_precision bf16` on an fp32 config trained in fp32 and said fp32 in its
    banner; now one line naming the one precision setting."""
    out = tmp_path / "out"
    proc = accelerate("--num_processes", "1", "--mixed_precision", "bf16", shards=tiny_shards, out=out)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("clipit: error:")]
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-2000:]
    assert "asks for mixed precision 'bf16', but the config trains in fp32" in errors[0]
    assert "methods.<m>.precision: bf16" in errors[0]
    assert f'File "{ROOT / "clipit"}' not in proc.stderr
    assert not (out / "runs" / "unimodal" / "seed-0" / "train_summary.json").exists()


def test_one_process_without_a_launcher_is_fine(tmp_path, tiny_shards):
    out = tmp_path / "out"
    sets = [a for s in [f"output_dir={out}", *tiny_shards, *PROBE] for a in ("--set", s)]
    proc = cli("train", "--config", TINY, "--method", "unimodal", "--seed", "0", *sets)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "world size 1, backend none, device cpu, precision fp32" in proc.stdout


def test_zero2_without_a_launcher_is_a_group_of_one(tmp_path, tiny_shards):
    """Without a launcher's env, DeepSpeed would look for MPI (mpi4py) and fail in a traceback."""
    sets = [f"output_dir={tmp_path}", *tiny_shards, *PROBE, "methods.unimodal.distributed=zero2"]
    proc = run_clipit(
        "train", "--config", TINY, "--method", "unimodal", "--seed", "0", *[a for s in sets for a in ("--set", s)]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world size 1, backend gloo" in proc.stdout and "distributed zero2" in proc.stdout
    assert "Setting accelerator to CPU" not in proc.stdout + proc.stderr  # known noise, dropped once
    assert (tmp_path / "runs" / "unimodal" / "seed-0" / "metrics.json").exists()


@pytest.mark.multiproc
@pytest.mark.slow
def test_zero2_with_several_seeds_in_one_launch_runs_a_process_per_seed(tmp_path, tiny_shards):
    """accelerate ties one DeepSpeed engine to a process: each seed of a launch is a cell with a process
    of its own (on every rank), so the second seed trains instead of crashing in DeepSpeed's backward."""
    import subprocess

    sets = [f"output_dir={tmp_path}", *tiny_shards, *PROBE, "methods.unimodal.distributed=zero2", "seeds=[0, 1]"]
    cmd = list(TORCHRUN_2)
    train = ["train", "--config", TINY, "--method", "unimodal", *[a for s in sets for a in ("--set", s)]]
    proc = subprocess.run([*cmd, *train], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for seed in (0, 1):
        summary = json.loads((tmp_path / "runs" / "unimodal" / f"seed-{seed}" / "train_summary.json").read_text())
        assert summary["world_size"] == 2
        assert proc.stdout.count(f"unimodal seed {seed}: balanced accuracy") == 1  # rank 0's process only
