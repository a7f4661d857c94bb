"""One writer per directory: an exclusive lock on `<dir>/.clipit.lock` while a process writes there.

POSIX record locks (`fcntl.lockf`) are used rather than `flock`: NFS passes them to the server's lock
manager, where `flock` may only lock the client; Lustre and GPFS honour them when mounted with lock
support. The kernel drops the lock when its process dies (kill -9 included), so a lock is never
stale. The file also records who holds it (host, pid, start), which the refusal message names.

A file system that cannot lock says so (one line naming the directory); `CLIPIT_NO_LOCK=1` then runs
without a lock, leaving one-writer-per-directory to the user.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import json
import os
import socket
import stat
import time
from pathlib import Path

from clipit.errors import WRITE_FAULTS, ClipitError, write_fault_message

LOCK_FILE = ".clipit.lock"
ENV_NO_LOCK = "CLIPIT_NO_LOCK"
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
_HELD = {errno.EACCES, errno.EAGAIN}


class LockError(ClipitError):
    """Another process writes this directory, or its file system cannot lock."""


class LockHeld(LockError):
    """Another process holds the lock (as opposed to a file system that cannot lock): worth waiting for."""


def holder(directory: str | Path) -> dict | None:
    """Who holds (or last held) the lock of `directory`, as recorded in its lock file."""
    try:
        fd = os.open(Path(directory) / LOCK_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb") as fh:
            return json.loads(fh.read(4096) or b"null") if stat.S_ISREG(os.fstat(fh.fileno()).st_mode) else None
    except (OSError, ValueError):
        return None


def _open_lock_file(path: Path) -> int:
    """The lock file, opened without following a link: a lock file replaced by a symbolic link (or by
    anything but a plain file) is refused, so taking a lock never writes outside its directory."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    except OSError as err:
        if err.errno in WRITE_FAULTS:  # a read-only or foreign run folder: nothing can be written there
            raise LockError(f"{path}: cannot create the lock file: {write_fault_message(err.errno)}") from None
        if err.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            raise LockError(
                f"{path}: the lock file is a {'symbolic link' if path.is_symlink() else 'non-regular file'}, which "
                f"clipit never follows or writes; delete it and rerun (one writer per directory)"
            ) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise LockError(f"{path}: the lock file is not a regular file; delete it and rerun (one writer per directory)")
    return fd


@contextlib.contextmanager
def exclusive(directory: str | Path, what: str = "directory", wait_s: float = 0.0, poll_s: float = 0.5):
    """Hold the lock of `directory` (created if needed) for the block.

    Another holder makes this wait up to `wait_s` seconds, then raise LockError naming it."""
    directory = Path(directory)
    if os.environ.get(ENV_NO_LOCK, "").lower() in ("1", "true", "yes"):
        yield
        return
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        if err.errno not in WRITE_FAULTS:
            raise
        raise LockError(f"{directory}: cannot create this {what}: {write_fault_message(err.errno)}") from None
    path = directory / LOCK_FILE
    fd = _open_lock_file(path)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as err:
                if err.errno in _UNSUPPORTED:
                    raise LockError(
                        f"{directory}: this file system cannot lock files ({os.strerror(err.errno)}), so "
                        f"clipit cannot keep a second process out of this {what}; set "
                        f"{ENV_NO_LOCK}=1 to run without the lock"
                    ) from None
                if err.errno not in _HELD:
                    raise
                if time.monotonic() >= deadline:
                    who = holder(directory) or {}
                    by = (
                        f"pid {who.get('pid')} on {who.get('host')} since {who.get('since')}"
                        if who
                        else "another process"
                    )
                    raise LockHeld(
                        f"{directory}: this {what} is being written by {by}; wait for it to finish or "
                        "stop it (one writer per directory)"
                    ) from None
                time.sleep(poll_s)
        record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "since": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
