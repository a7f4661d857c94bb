"""clipit/progress.py in a real child process: a bar only on a terminal (a pty), plain lines otherwise."""

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios

from clipit_testing import ROOT

LOOP = (
    "from clipit.progress import progress\n"
    "for _ in progress(range(25), desc='encode', unit='batch', every=10): pass\n"
    "for _ in progress(iter(range(250)), desc='stream', unit='batch'): pass\n"
    "print('done', flush=True)\n"
)


def test_batch_job_gets_plain_lines_on_stderr_and_no_bar():
    proc = subprocess.run([sys.executable, "-c", LOOP], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "done\n"  # stdout stays the command's output
    assert "\r" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert [line.split(",")[0] for line in lines] == [
        "encode: 10/25 batches (40%)",
        "encode: 20/25 batches (80%)",
        "encode: 25/25 batches (100%)",
        "stream: 100 batches",
        "stream: 200 batches",
    ]  # no total: every 100 items, nothing at the end


def test_terminal_gets_a_bar():
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a fresh pty is 0 columns wide
    proc = subprocess.Popen([sys.executable, "-c", LOOP], cwd=ROOT, stdout=subprocess.PIPE, stderr=follower)
    os.close(follower)  # the child holds its own copy: reading ends (EIO) once it exits
    seen = b""
    try:
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(leader)
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and out == b"done\n"
    assert b"\r" in seen and b"encode:" in seen and b"/25" in seen  # tqdm draws and redraws in place
    assert b"encode: 10/25 batches" not in seen  # and no plain lines
