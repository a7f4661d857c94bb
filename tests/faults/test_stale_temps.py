"""Temporaries a killed writer left in a run folder (kill -9 between writing `.best.safetensors.*.tmp` and
its rename) are swept when the next writer takes the folder; a live writer's on this host, and another
host's, are kept."""

import os
import socket
import subprocess

from clipit.io import sweep_stale_temps_in
from clipit_testing import ROOT, TINY, cli_main


def temps(directory, dead_pid: int, live_pid: int):
    host = socket.gethostname()
    stale = directory / f".best.safetensors.{host}-{dead_pid}.k3j.tmp"
    live = directory / f".best.safetensors.{host}-{live_pid}.a1b.tmp"
    foreign = directory / f".best.safetensors.other-node-{dead_pid}.zz.tmp"
    for path in (stale, live, foreign):
        path.write_bytes(b"half a checkpoint")
    return stale, live, foreign


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_sweep_removes_only_a_dead_writers_temporaries(tmp_path):
    sleeper = subprocess.Popen(["sleep", "600"])
    try:
        stale, live, foreign = temps(tmp_path, dead_pid(), sleeper.pid)
        (tmp_path / "best.safetensors").write_bytes(b"the real one")
        assert sweep_stale_temps_in(tmp_path) == [stale]
        assert live.exists() and foreign.exists() and (tmp_path / "best.safetensors").exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_training_sweeps_a_killed_runs_temporaries(tiny_shards, tmp_path, capsys):
    run = tmp_path / "out" / "runs" / "unimodal" / "seed-0"
    run.mkdir(parents=True)
    stale, live, _ = temps(run, dead_pid(), os.getpid())  # this process is alive: its temp stays
    sets = [f"output_dir={tmp_path / 'out'}", *tiny_shards, "methods.unimodal.epochs=1"]
    argv = ["train", "--config", str(ROOT / TINY), "--method", "unimodal", "--seed", "0"]
    assert cli_main(argv + [a for s in sets for a in ("--set", s)]) == 0, capsys.readouterr().err[-2000:]
    assert not stale.exists() and live.exists()
    assert (run / "train_summary.json").exists()
