"""A lock file replaced by a symbolic link (or by anything but a plain file) is refused with one line:
taking a lock never follows a link and never writes outside its directory."""

import os

import pytest

from clipit.locks import LOCK_FILE, LockError, exclusive, holder
from clipit_testing import ROOT, TINY, cli_main


def test_a_lock_file_that_is_a_symlink_is_never_followed(tmp_path):
    victim = tmp_path / "precious.txt"
    victim.write_text("do not touch")
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_FILE).symlink_to(victim)
    with pytest.raises(LockError, match=rf"^{run / LOCK_FILE}: the lock file is a symbolic link, which clipit never"):
        with exclusive(run, "run directory"):
            pass
    assert victim.read_text() == "do not touch"
    assert holder(run) is None  # reading who holds it does not follow the link either


def test_a_dangling_lock_link_creates_nothing_outside(tmp_path):
    target = tmp_path / "elsewhere" / "created.txt"
    target.parent.mkdir()
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_FILE).symlink_to(target)
    with pytest.raises(LockError, match="symbolic link"):
        with exclusive(run):
            pass
    assert not target.exists()


def test_a_lock_file_that_is_a_fifo_or_folder_is_refused(tmp_path):
    fifo_dir, dir_dir = tmp_path / "a", tmp_path / "b"
    fifo_dir.mkdir()
    os.mkfifo(fifo_dir / LOCK_FILE)
    (dir_dir / LOCK_FILE).mkdir(parents=True)
    for directory in (fifo_dir, dir_dir):
        with pytest.raises(LockError, match="non-regular file|not a regular file"):
            with exclusive(directory):
                pass


def test_train_on_a_run_whose_lock_is_a_symlink_exits_2_and_keeps_the_target(tmp_path, tiny_shards, capsys):
    victim = tmp_path / "precious.txt"
    victim.write_text("do not touch")
    run = tmp_path / "out" / "runs" / "unimodal" / "seed-0"
    run.mkdir(parents=True)
    (run / LOCK_FILE).symlink_to(victim)
    sets = [f"output_dir={tmp_path / 'out'}", *tiny_shards]
    argv = ["train", "--config", str(ROOT / TINY), "--method", "unimodal", "--seed", "0"]
    code = cli_main(argv + [a for s in sets for a in ("--set", s)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "the lock file is a symbolic link" in err[0], err
    assert victim.read_text() == "do not touch"
