"""A run folder on a read-only mount: `clipit evaluate` (and any writer) says so in one line, exit 2,
instead of a PermissionError/OSError traceback from the lock file."""

import contextlib
import os
import shutil
import subprocess

import pytest

from clipit.errors import OutputError
from clipit.io import atomic_write_json
from clipit.locks import LockError, exclusive
from clipit_testing import ROOT, TINY, cli_main


@contextlib.contextmanager
def read_only(directory):
    """`directory` bind-mounted read-only onto itself (root only; skips elsewhere)."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("a read-only bind mount needs root")
    if subprocess.run(["mount", "--bind", str(directory), str(directory)], capture_output=True).returncode != 0:
        pytest.skip("cannot bind-mount here")
    try:
        proc = subprocess.run(["mount", "-o", "remount,ro,bind", str(directory)], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot remount read-only: {proc.stderr.strip()}")
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], capture_output=True)


def test_lock_and_writers_on_a_read_only_folder_are_one_line(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with read_only(run):
        with pytest.raises(LockError, match=rf"^{run / '.clipit.lock'}: cannot create the lock file: read-only file"):
            with exclusive(run, "run directory"):
                pass
        with pytest.raises(OutputError, match=rf"^{run / 'x.json'}: read-only file system"):
            atomic_write_json(run / "x.json", {"a": 1})
        with pytest.raises(LockError, match=r"cannot create this run directory: read-only file system"):
            with exclusive(run / "new", "run directory"):
                pass


def test_evaluate_on_a_read_only_run_folder_exits_2_in_one_line(tmp_path, capsys):
    out = tmp_path / "out"
    run = out / "runs" / "unimodal" / "seed-0"
    run.mkdir(parents=True)
    (run / "train_summary.json").write_text('{"steps": 1}')  # trained, not evaluated
    with read_only(out):
        argv = ["evaluate", "--config", str(ROOT / TINY), "--method", "unimodal", "--seed", "0"]
        code = cli_main([*argv, "--set", f"output_dir={out}", "--set", f"shards.dir={tmp_path / 'shards'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "read-only file system" in err[0] and str(run) in err[0]
