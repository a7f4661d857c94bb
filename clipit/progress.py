"""Progress of long loops: a tqdm bar on a terminal, plain lines in batch jobs.

A bar's carriage returns turn a SLURM log into one unreadable line, so a bar is drawn only when
stderr is a terminal. Otherwise a line goes to stderr every `every` items (and after the last one
when the total is known), e.g. `embed train images: 40/120 batches (33%), 12.5 batches/s, 3 s`.
Lines go to stderr so that stdout stays the command's output (JSON of `clipit pair`, `predict --json`).

    for batch in progress(loader, total=len(loader), desc="embed train images", unit="batch"):
        ...
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
PLAIN_LINES = 10  # with a known total and no `every`: about this many lines per loop
UNKNOWN_EVERY = 100  # with no total and no `every`: a line every this many items


def is_terminal() -> bool:
    """Whether bars may be drawn: stderr (where tqdm draws) is a terminal."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else (f"{minutes}:{secs:02d}" if minutes else f"{secs} s")


class Progress:
    """A counter shown as a bar (terminal) or as plain lines every `every` items (otherwise).

    `enabled=False` shows nothing (ranks other than 0). `note(text)` says what runs now (a bar's
    postfix, or one line at once); `write(line)` prints a line to stdout without breaking a bar."""

    def __init__(
        self,
        total: int | None = None,
        desc: str = "",
        unit: str = "it",
        every: int | None = None,
        enabled: bool = True,
        initial: int = 0,
        leave: bool = False,
        bar: bool | None = None,
    ):
        self.total, self.desc, self.unit, self.n, self.enabled = total, desc, unit, initial, enabled
        self.every = every or (max(1, math.ceil(total / PLAIN_LINES)) if total else UNKNOWN_EVERY)
        self._start, self._start_n = time.monotonic(), initial
        self._bar = None
        if enabled and (is_terminal() if bar is None else bar):
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave, dynamic_ncols=True)

    def update(self, n: int = 1, info: str | None = None) -> None:
        """`n` more items done; `info` (e.g. the loss) goes to the bar's postfix or the next line."""
        before, self.n = self.n, self.n + n
        if self._bar is not None:
            if info:
                self._bar.set_postfix_str(info, refresh=False)
            self._bar.update(n)
        elif self.enabled and (
            self.n // self.every > before // self.every or (self.total is not None and before < self.total <= self.n)
        ):
            self._line(self.status() + (f", {info}" if info else ""))

    def status(self) -> str:
        """`40/120 batches (33%), 12.5 batches/s, 3 s` (the plain line's body)."""
        elapsed = time.monotonic() - self._start
        done = f"{self.n}/{self.total}" if self.total else str(self.n)
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        rate = (self.n - self._start_n) / elapsed if elapsed > 0 else 0.0
        units = self.unit + ("es" if self.unit.endswith(("s", "sh", "ch", "x")) else "s")
        return f"{done} {units}{pct}, {rate:.3g} {units}/s, {format_duration(elapsed)}"

    def note(self, text: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(text)
        elif self.enabled:
            done = f"{self.n + 1}/{self.total}" if self.total else str(self.n + 1)
            self._line(f"[{done}] {text}")

    def write(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def _line(self, body: str) -> None:
        print(f"{self.desc}: {body}" if self.desc else body, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(
    iterable: Iterable[T],
    total: int | None = None,
    desc: str = "",
    every: int | None = None,
    unit: str = "it",
    enabled: bool = True,
    leave: bool = False,
) -> Iterator[T]:
    """Yield the items of `iterable`, showing progress (see the module docstring)."""
    if total is None and hasattr(iterable, "__len__"):
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:  # e.g. an IterableDataset's loader
            total = None
    with Progress(total=total, desc=desc, unit=unit, every=every, enabled=enabled, leave=leave) as bar:
        for item in iterable:
            yield item
            bar.update()
