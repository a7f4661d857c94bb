"""The one base class of errors a user can fix, and the one way to print an error on one line.

Every stage raises a `ClipitError` subclass (bad config, bad data, missing weights, a run that
cannot be exported ...) whose message names the file or key and the fix. `clipit.cli` catches this
base class alone: one line on stderr, exit status 2, no traceback (`clipit --debug` shows it).
Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


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
