"""The one base class of errors a user can fix, and the one way to print an error on one line.

Every stage raises a `ClipitError` subclass (bad config, bad data, missing weights, a run that
cannot be exported ...) whose message names the file or key and the fix. `clipit.cli` catches this
base class alone: one line on stderr, exit status 2, no traceback (`clipit --debug` shows it).
Anything else is a bug and keeps its traceback, with one exception: an output that cannot be written
because its disk is full, over quota or read-only is the user's to fix too. clipit/io.py's atomic
writers raise `OutputError` for it, and `cli.main` maps an ENOSPC/EDQUOT OSError that escapes any other
writer (`disk_full_is_an_error`); `write_fault_message` is the one wording of both.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import os


class ClipitError(ValueError):
    """A problem the user can fix; the message names the file or key and what to do instead.

    Subclasses ValueError so that library callers who catch ValueError keep working."""

    exit_code = 2


class ConfigError(ClipitError):
    """A config file (or an override) is wrong; the message names the file, the key and what to write instead."""


def one_line(err: BaseException | str, limit: int = 400) -> str:
    """`err` on one line, for messages that embed another error.

    A clipit error keeps its whole message (whitespace folded: it was written to be read in full); a
    foreign exception (OSError, a library's RuntimeError ...) is its type and first non-empty line,
    since the rest is usually a stack of details that belongs in a --debug traceback."""
    if isinstance(err, str):
        text = " ".join(err.split())
    elif isinstance(err, ClipitError):
        text = " ".join(str(err).split()) or type(err).__name__
    else:
        lines = [s.strip() for s in str(err).strip().splitlines() if s.strip()]
        text = f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class OutputError(ClipitError):
    """An output cannot be written: its disk is full or over quota, or its file system is read-only."""


# a full disk, a quota, a read-only file system, a folder the user may not write
WRITE_FAULTS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # what cli.main maps when it escapes a writer outside clipit/io.py
# The setting that moves a command's outputs; `clipit report` says --out (output_setting below).
_ELSEWHERE = contextvars.ContextVar("clipit_output_setting", default="set output_dir elsewhere")


@contextlib.contextmanager
def output_setting(advice: str):
    """Within the block, a write fault advises `advice` (e.g. "give --out another folder")."""
    token = _ELSEWHERE.set(advice)
    try:
        yield
    finally:
        _ELSEWHERE.reset(token)


def write_fault_message(code: int) -> str:
    """What the user reads for a write fault: the one home of the full-disk wording."""
    elsewhere = _ELSEWHERE.get()
    if code == errno.EROFS:
        return f"read-only file system ({elsewhere})"
    if code in (errno.EACCES, errno.EPERM):
        return f"no permission to write there (fix its permissions or {elsewhere})"
    if code == errno.EDQUOT:
        return f"disk quota exceeded (free space or {elsewhere})"
    return f"no space left on device (free space or {elsewhere})"


def write_fault(err: BaseException, codes=tuple(WRITE_FAULTS)) -> int | None:
    """The errno in `codes` behind `err`: an OSError's own, one in its cause/context chain, or one named in
    a library's message (safetensors reports "No space left on device (os error 28)" in its own type)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in codes:
            return err.errno
        if not isinstance(err, ClipitError):
            text = str(err)
            for code in codes:  # "Permission denied" in a message may be a read: only an errno counts for it
                if code not in (errno.EACCES, errno.EPERM) and os.strerror(code) in text:
                    return code
        err = err.__cause__ or err.__context__
    return None


@contextlib.contextmanager
def disk_full_is_an_error():
    """Turn an OSError ENOSPC/EDQUOT that escapes the block (a writer outside clipit/io.py) into one
    OutputError line; every other OSError stays a bug with its traceback."""
    try:
        yield
    except OSError as err:
        if err.errno not in DISK_FULL:
            raise
        where = err.filename if err.filename is not None else "writing an output"
        raise OutputError(f"{where}: {write_fault_message(err.errno)}") from err
