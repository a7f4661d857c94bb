"""One writer per directory: a second process is refused with one line naming the holder, a dead
holder (kill -9) leaves no stale lock."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from clipit.locks import LockError, exclusive, holder

HOLD = textwrap.dedent("""
    import sys, time
    from clipit.locks import exclusive
    with exclusive(sys.argv[1], "run directory"):
        print("locked", flush=True)
        time.sleep(600)
""")


@pytest.fixture
def held(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    yield tmp_path, proc
    proc.kill()
    proc.wait()


def test_second_writer_is_refused_naming_the_holder(held):
    directory, proc = held
    with pytest.raises(LockError) as err:
        with exclusive(directory, "run directory"):
            pass
    msg = str(err.value)
    assert f"pid {proc.pid}" in msg and "is being written by" in msg and "\n" not in msg
    assert holder(directory)["pid"] == proc.pid


def test_kill_9_releases_the_lock(held):
    directory, proc = held
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with exclusive(directory, "run directory"):  # no stale lock after a hard kill
        assert holder(directory)["pid"] == os.getpid()


def test_waiting_writer_gets_the_lock_once_the_holder_ends(held):
    directory, proc = held
    subprocess.Popen(["sh", "-c", f"sleep 1; kill {proc.pid}"])
    with exclusive(directory, "run directory", wait_s=60, poll_s=0.1):
        assert holder(directory)["pid"] == os.getpid()


def test_opt_out_for_file_systems_without_locks(held, monkeypatch):
    directory, _ = held
    monkeypatch.setenv("CLIPIT_NO_LOCK", "1")
    with exclusive(directory):
        pass
