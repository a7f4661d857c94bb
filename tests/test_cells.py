"""One process per cell (clipit/cells.py): a chain runs each cell as a `clipit` child process, streams
its output, runs the cells that do not depend on a failed one, skips those that do and reports the
failure in one line; a DDP cell and a DeepSpeed cell run in one chain; a process refuses a second
accelerate setting or a second DeepSpeed run with one line."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from clipit.cells import ChainCell, ConfigSource, cell_argv, chain_error, child_env, last_error_line, run_chain
from clipit_testing import ROOT, TINY, TORCHRUN_2, assert_refused, run_clipit


def sets(*items: str) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def test_cell_argv_is_the_train_command():
    source = ConfigSource("c.yaml", ("seeds=[0]", "output_dir=/x y"))
    assert cell_argv("train", source, "clipit", 1, "--resume", "none") == [
        "train",
        "--config",
        "c.yaml",
        "--set",
        "seeds=[0]",
        "--set",
        "output_dir=/x y",
        "--method",
        "clipit",
        "--seed",
        "1",
        "--resume",
        "none",
    ]


def test_each_cell_of_a_distributed_chain_rendezvous_on_its_own_port():
    ranks = {"WORLD_SIZE": "2", "RANK": "1", "MASTER_PORT": "29500", "TORCHELASTIC_USE_AGENT_STORE": "True"}
    ports = [child_env(slot, ranks)["MASTER_PORT"] for slot in range(3)]
    assert ports == ["29501", "29502", "29503"]  # every rank computes the same port for the same slot
    env = child_env(0, ranks)
    assert env["RANK"] == "1" and env["PYTHONUNBUFFERED"] == "1" and "TORCHELASTIC_USE_AGENT_STORE" not in env
    assert child_env(0, {"MASTER_PORT": "29500"})["MASTER_PORT"] == "29500"  # one process: untouched
    assert child_env(1, ranks | {"MASTER_PORT": "65535"})["MASTER_PORT"] == "1026"  # wraps above 1023


def test_last_error_line_prefers_clipit_errors():
    assert last_error_line("x\r\nclipit: error: a.yaml: bad\n\n") == "a.yaml: bad"
    assert last_error_line("Traceback ...\n  File x\nValueError: boom\n") == "ValueError: boom"
    assert last_error_line("") == "no output"


def test_a_failed_cell_skips_its_dependents_only_and_fails_in_one_line(tmp_path, capsys):
    """Real child processes (cheap clipit commands): the failed cell's error line is quoted, the
    independent sibling ran after it (its output streamed here), the dependent cell was skipped."""
    missing = tmp_path / "missing.yaml"
    bad = ChainCell("unimodal seed 0", tuple(cell_argv("train", ConfigSource(str(missing)), "unimodal", 0)))
    cells = [
        bad,
        ChainCell("clipit seed 0", ("--version",), needs=("unimodal seed 0",)),
        ChainCell("unimodal seed 1", ("--version",)),
    ]
    outcomes = run_chain(cells)
    out = capsys.readouterr()
    assert outcomes["unimodal seed 1"] is None and out.out.count("clipit ") >= 1
    assert out.out.index("[clipit] unimodal seed 1") > out.out.index("[clipit] unimodal seed 0")
    assert outcomes["clipit seed 0"].startswith("skipped") and "unimodal seed 0" in outcomes["clipit seed 0"]
    assert outcomes["unimodal seed 0"].startswith("exit 2: ") and str(missing) in outcomes["unimodal seed 0"]
    assert "clipit: error:" not in out.err  # held back: the one line of the chain quotes it
    message = str(chain_error(outcomes))
    assert "\n" not in message and message.startswith("cell unimodal seed 0 failed (exit 2: ")
    assert "skipped (warm start did not finish): clipit seed 0" in message
    assert message.endswith("1 of 3 cells finished")
    assert chain_error({"a": None}) is None


def test_one_process_refuses_a_second_setting_and_a_second_deepspeed_run():
    """What a cell's process guards (a chain never gets there: each cell has its own process)."""
    code = """
from clipit.config import TrainConfig
from clipit.training.accel import claim_deepspeed_run, make_accelerator
a = make_accelerator(TrainConfig(distributed="zero2"))
claim_deepspeed_run(a, "runs/a")
claim_deepspeed_run(make_accelerator(TrainConfig(distributed="zero2")), "runs/a")  # evaluation: same run
for step in (lambda: claim_deepspeed_run(a, "runs/b"), lambda: make_accelerator(TrainConfig())):
    try:
        step()
    except ValueError as err:
        print(type(err).__name__, err)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("ConfigError")]
    assert len(lines) == 2, proc.stdout
    assert "runs/b: this process already trained runs/a under DeepSpeed" in lines[0]
    assert "already runs distributed=zero2, precision=fp32" in lines[1] and "distributed=ddp" in lines[1]
    assert all("a process of its own" in line for line in lines)


def demo_args(out: Path, shards: list[str], *extra: str) -> list[str]:
    return ["demo", "--config", TINY, *sets(f"output_dir={out}", *shards, *extra)]


@pytest.mark.multiproc
@pytest.mark.slow
def test_ddp_cell_then_zero2_cell_in_one_chain(tiny_shards, tmp_path):
    """The demo on 2 ranks (torchrun, gloo): unimodal under DDP, then CLIP-IT warm-started from it under
    DeepSpeed ZeRO-2. Each rank's parent starts its rank's process per cell; both cells finish."""
    out = tmp_path / "out"
    chain = demo_args(out, tiny_shards, "seeds=[0]", "methods.clipit.distributed=zero2")
    cmd = list(TORCHRUN_2)
    proc = subprocess.run([*cmd, *chain], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    assert "world size 2, backend gloo" in proc.stdout
    for method, strategy in (("unimodal", "ddp"), ("clipit", "zero2")):
        line = (
            rf"\[clipit train\] {method} seed 0: world size 2, backend gloo, device cpu\S*, .* distributed {strategy}$"
        )
        assert len(re.findall(line, proc.stdout, re.M)) == 1, proc.stdout[-3000:]  # rank 0's child only
        run = out / "runs" / method / "seed-0"
        assert json.loads((run / "train_summary.json").read_text())["world_size"] == 2
        assert json.loads((run / "metrics.json").read_text())["n"] == 128
    assert proc.stdout.count("[clipit] clipit seed 0: clipit train") == 1  # the parents' lines: rank 0 only
    assert (out / "results.md").read_text().startswith("| method |")
    assert "Traceback" not in proc.stderr and "terminate called" not in proc.stderr


@pytest.mark.slow
def test_demo_with_a_corrupt_warm_start_finishes_the_other_cells(tiny_shards, tmp_path):
    """unimodal seed 0 is 'finished' with a damaged best checkpoint: CLIP-IT seed 0 (its warm start)
    fails; the seed-1 cells still train and evaluate; the demo exits 2 with one line naming the cell."""
    out = tmp_path / "out"
    done = out / "runs" / "unimodal" / "seed-0"
    done.mkdir(parents=True)
    (done / "best.safetensors").write_bytes(b"not a safetensors file")
    (done / "best.json").write_text("{}")
    (done / "train_summary.json").write_text("{}")
    (done / "metrics.json").write_text(json.dumps({"balanced_accuracy": 0.5, "accuracy": 0.5, "n": 128}))
    proc = run_clipit(*demo_args(out, tiny_shards), timeout=900)
    line = assert_refused(proc, out / "runs" / "clipit" / "seed-0", absent=("train_summary.json", "metrics.json"))
    assert line.startswith("clipit: error: cell clipit seed 0 failed (exit 2: ") and "best.safetensors" in line
    assert line.endswith("2 of 3 cells finished")  # unimodal seed 0 is reused (clipit/reruns.py), not run
    for method in ("unimodal", "clipit"):
        assert json.loads((out / "runs" / method / "seed-1" / "metrics.json").read_text())["n"] == 128
    assert "clipit seed 1: balanced accuracy" in proc.stdout  # the children's output reached the user
    assert not (out / "results.md").exists()


def test_a_stop_signal_reaches_the_cell_then_the_parents_own_handler():
    """SIGUSR2 to the parent (SLURM before the time limit) goes to the running cell, which saves and
    exits; submitit's handler (here a recorder) runs only after the cell has exited."""
    import signal

    from clipit.cells import _after_signals, _forward_signals

    code = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGUSR2, lambda *a: sys.exit(7))\n"
        "print('ready', flush=True)\n"
        "time.sleep(120)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    seen = []
    before = signal.signal(signal.SIGUSR2, lambda signum, frame: seen.append((signum, child.poll())))
    try:
        assert child.stdout.readline() == "ready\n"  # its handler is installed: no race
        previous, pending = _forward_signals(child)
        signal.raise_signal(signal.SIGUSR2)
        assert child.wait(timeout=60) == 7 and pending == [signal.SIGUSR2] and seen == []
        _after_signals(previous, pending)
        assert seen == [(signal.SIGUSR2, 7)]  # the parent's handler ran after the cell exited
    finally:
        signal.signal(signal.SIGUSR2, before)
        if child.poll() is None:
            child.kill()
        child.wait()
        child.stdout.close()
