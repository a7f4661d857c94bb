"""Atomic file output and content hashes: the one home of both.

Every output goes through `atomic_path` (or `atomic_dir` for a directory): written under a temporary
sibling name, fsynced, then renamed over the target, so a killed job leaves either the old file or
the new one, never half of one, and a rename never publishes bytes that are not on disk. The fsync is
decided here once, for every writer: outputs are few and large (shards, checkpoints) or tiny (JSON),
and a cluster node that loses power must not leave a shard that passes its existence check. A full
disk (ENOSPC, EDQUOT) or a read-only file system (EROFS) on the way is one `OutputError` line naming
the output; the temporary file goes, the old output stays.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import signal
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from clipit.errors import ClipitError, OutputError, write_fault, write_fault_message

_UMASK = os.umask(0)
os.umask(_UMASK)  # read once: mkstemp creates 0600 files, outputs should follow the user's umask


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_FULL_BELOW = 1 << 20  # a file system with less than 1 MiB left for this user counts as full


def _as_write_fault(err: Exception, path: Path, probe: Path) -> OutputError | None:
    """OutputError naming `path` when `err` is a full disk, a quota or a read-only file system.

    Errors carrying an errno (or naming one) are clear. Some writers report a full disk without one
    (numpy: "N requested and M written", torch.save: "unexpected pos"), so any other failure of a write
    whose file system (`probe`, checked before the temporary file is removed) has no room left counts
    as a full disk too. A clipit error (an inner helper's OutputError included) is left as it is."""
    if isinstance(err, ClipitError):
        return None
    code = write_fault(err)
    if code in (errno.EACCES, errno.EPERM) and getattr(err, "filename", None) is not None:
        if Path(err.filename).parent != path.parent:  # an input the block read, not this output
            return None
    if code is None:
        with contextlib.suppress(OSError):
            st = os.statvfs(probe)
            if st.f_bavail * st.f_frsize < _FULL_BELOW:
                code = errno.ENOSPC
    return OutputError(f"{path}: {write_fault_message(code)}") if code is not None else None


def make_dirs(path: str | Path) -> Path:
    """mkdir -p, with a full or read-only file system reported as one OutputError line."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        if (code := write_fault(err)) is None:
            raise
        raise OutputError(f"{path}: {write_fault_message(code)}") from None
    return path


def temp_prefix(name: str) -> str:
    """`.NAME.HOST-PID.`: a temporary sibling of output NAME says who wrote it, so a later start can sweep
    the ones whose writer is gone (killed) without touching those of a writer still running."""
    return f".{name}.{socket.gethostname()}-{os.getpid()}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_temps(path: str | Path, suffixes: tuple[str, ...] = (".tmp", ".rows")) -> list[Path]:
    """Remove the temporary siblings of output `path` left by a writer on this host that no longer runs
    (kill -9, a power loss); returns them. Others' temporaries, and a live writer's, stay."""
    path = Path(path)
    mine = f".{path.name}.{socket.gethostname()}-"
    removed = []
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in path.parent.iterdir():
            pid = entry.name[len(mine) :].split(".", 1)[0]
            if entry.name.startswith(mine) and entry.name.endswith(suffixes) and pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
                removed.append(entry)
    return removed


@contextlib.contextmanager
def termination_cleans_up(signals: tuple[int, ...] = (signal.SIGTERM,)):
    """Within the block, SIGTERM (what SLURM preemption and `kill` send) ends the process through Python
    (SystemExit 128+signal), so the atomic writers' cleanup runs and no temporary file is left behind."""

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = {}
    try:
        for sig in signals:
            with contextlib.suppress(ValueError):  # not the main thread: nothing to install
                previous[sig] = signal.signal(sig, stop)
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path next to `path`; it replaces `path` (fsynced first) only if the block succeeds.

    A full disk, a quota or a read-only file system anywhere on the way (the block's own writes
    included) is an OutputError naming `path`; the temporary file is removed and `path` keeps its old
    content."""
    path = Path(path)
    tmp = None
    try:
        make_dirs(path.parent)
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), suffix=".tmp", dir=path.parent)
        os.close(fd)
        yield Path(tmp)
        _fsync(Path(tmp))
        os.chmod(tmp, 0o666 & ~_UMASK)  # readable by the group on shared clusters, like a plain open()
        os.replace(tmp, path)
    except Exception as err:
        if (fault := _as_write_fault(err, path, Path(tmp) if tmp else path.parent)) is not None:
            raise fault from None
        raise
    finally:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | Path):
    """Yield an empty temporary directory next to `path`; it replaces `path` only if the block succeeds.

    A non-empty directory cannot be renamed onto, so an old `path` is first moved aside and removed
    after the swap: a reader sees the old directory, no directory, or the new one, never a mix. A full
    disk (or quota, or read-only file system) is an OutputError naming `path`, as in atomic_path."""
    path = Path(path)
    tmp = None
    try:
        make_dirs(path.parent)
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(path.name), suffix=".tmp", dir=path.parent))
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                _fsync(file)
        os.chmod(tmp, 0o777 & ~_UMASK)
        replace_dir(tmp, path)
    except Exception as err:
        if (fault := _as_write_fault(err, path, tmp or path.parent)) is not None:
            raise fault from None
        raise
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(src: str | Path, dst: str | Path) -> None:
    """Rename the finished directory `src` over `dst` (old one moved aside first, then removed)."""
    src, dst = Path(src), Path(dst)
    old = dst.with_name(f".{dst.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=True, default=_json_default) + "\n")


def atomic_save_npz(path: str | Path, **arrays) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)


def atomic_save_npy(path: str | Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, np.ascontiguousarray(array))


def read_json(path: str | Path):
    return json.loads(Path(path).read_text())


def _unreadable(path: Path, why: str) -> ClipitError:
    return ClipitError(f"{path}: {why}")


def read_json_object(
    path: str | Path,
    fix: str = "",
    error: Callable[[Path, str], Exception] = _unreadable,
    missing_ok: bool = False,
) -> dict | None:
    """The JSON object stored in `path`: the one reader that maps every way such a file can be bad to one line.

    Missing (None with `missing_ok`), unreadable, not UTF-8, not JSON, or JSON that is not an object each
    raise `error(path, why)`, where `why` says what is wrong and ends in `; fix` when a fix is given."""
    path = Path(path)
    suffix = f"; {fix}" if fix else ""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if missing_ok:
            return None
        raise error(path, f"not found{suffix}") from None
    except UnicodeDecodeError:
        raise error(path, f"not UTF-8 text{suffix}") from None
    except OSError as err:
        raise error(path, f"cannot read ({err.strerror or type(err).__name__}){suffix}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise error(path, f"not valid JSON ({err.msg} at line {err.lineno}){suffix}") from None
    if not isinstance(data, dict):
        raise error(path, f"holds a JSON {type(data).__name__}, not an object{suffix}")
    return data


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks (shards and checkpoints are large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _json_default(obj):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
