"""A cell (one method and seed of a config) runs in a process of its own.

Whatever chains cells (`clipit demo`, `clipit train|evaluate` over several seeds, a grid task, the
prepare jobs) plans and supervises; each cell is `python -m clipit <command> ...` in a child
process, so the cell's Accelerator (and DeepSpeed engine) is its own and ends with it, and a crash
in one cell cannot take its siblings down. The child's output is streamed as it comes; a failed
cell is reported with its last error line, and the cells that warm-start from it are skipped.

Distributed chains (several ranks, e.g. a grid task over srun or `torchrun ... clipit train` with
several seeds): each rank's parent starts its rank's child with its own rank environment, so the
launcher (srun, torchrun) keeps placing, binding and signalling the processes. The parents never
join a process group; each cell's children rendezvous on a port of their own (`child_env`), so a
cell never meets the store of the cell before it.
"""

from __future__ import annotations

import codecs
import os
import re
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass

from clipit.errors import ClipitError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)  # forwarded to the running cell (it checkpoints)
ERROR_PREFIX = "clipit: error:"


class CellsFailed(ClipitError):
    """One or more cells of a chain failed (each in its own process); the others ran."""


@dataclass(frozen=True)
class ConfigSource:
    """An experiment config as a command gets it: the file and its `--set` overrides."""

    path: str
    overrides: tuple[str, ...] = ()

    def args(self) -> list[str]:
        return ["--config", str(self.path), *[a for item in self.overrides for a in ("--set", item)]]


def cell_argv(command: str, source: ConfigSource, method: str, seed: int, *extra: str) -> list[str]:
    """The clipit argv of one cell (`train` or `evaluate`); the one place it is spelled."""
    return [command, *source.args(), "--method", method, "--seed", str(seed), *extra]


@dataclass(frozen=True)
class ChainCell:
    """One cell of a chain: a label for messages, its clipit argv, and the labels it warm-starts from."""

    label: str
    argv: tuple[str, ...]
    needs: tuple[str, ...] = ()


def is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def child_env(slot: int = 0, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a chain's `slot`-th cell: the parent's (rank variables included), unbuffered
    output, and under several ranks a rendezvous port of its own: every rank computes the same one, and
    a rank that starts the next cell early never reaches the previous cell's store (or the agent's)."""
    env = dict(os.environ if base is None else base)
    env["PYTHONUNBUFFERED"] = "1"
    if int(env.get("WORLD_SIZE", "1") or 1) > 1 and env.get("MASTER_PORT", "").isdigit():
        low, span = 1024, 65535 - 1024
        env["MASTER_PORT"] = str(low + (int(env["MASTER_PORT"]) - low + 1 + slot) % span)
        env.pop("TORCHELASTIC_USE_AGENT_STORE", None)  # rank 0 of the cell hosts its own store
    return env


def last_error_line(tail: str) -> str:
    """What to quote of a failed child: its `clipit: error:` line, else its last line (a traceback's)."""
    lines = [line.strip() for line in re.split(r"[\r\n]+", tail) if line.strip()]
    for line in reversed(lines):
        if line.startswith(ERROR_PREFIX):
            return line[len(ERROR_PREFIX) :].strip()
    return lines[-1] if lines else "no output"


def _pump(fd: int, stream, keep: list[str] | None) -> None:
    """Copy a child's output to `stream` as it comes. With `keep` (stderr): keep the tail for the error
    line, and hold back the child's `clipit: error:` line, which the parent's one line quotes."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending = ""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # a pty's end of file
            chunk = b""
        text = pending + decoder.decode(chunk, final=not chunk)
        pending = ""
        if keep is not None:
            lines = re.split(r"(?<=\n)|(?<=\r)(?!\n)", text)  # whole lines (a bar's \r ends one too)
            if chunk and (lines[-1].startswith(ERROR_PREFIX) or ERROR_PREFIX.startswith(lines[-1])):
                pending = lines.pop()  # may be the error line: wait for its end
            keep[0] = (keep[0] + "".join(lines))[-8192:]
            text = "".join(line for line in lines if not line.startswith(ERROR_PREFIX))
        if text:
            stream.write(text)
            stream.flush()
        if not chunk:
            os.close(fd)
            return


def _forward_signals(process: subprocess.Popen) -> tuple[dict, list[int]]:
    """Stop signals reach the running cell (it saves a checkpoint); the parent's own handler (submitit's
    requeue) runs after the cell has exited. Returns (previous handlers, pending signals)."""
    previous, pending = {}, []

    def forward(signum, frame):
        pending.append(signum)
        if process.poll() is None:
            process.send_signal(signum)

    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            previous[sig] = signal.signal(sig, forward)
    return previous, pending


def _after_signals(previous: dict, pending: list[int]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)
    if pending:
        handler = previous.get(pending[0], signal.SIG_DFL)
        if callable(handler):
            handler(pending[0], None)  # submitit: checkpoint (requeue) and exit
        elif handler != signal.SIG_IGN:
            signal.raise_signal(pending[0])


def run_cell(argv: list[str] | tuple[str, ...], slot: int = 0) -> str | None:
    """Run `python -m clipit *argv` as a child and wait; None on success, else why it failed (one line).

    stdout and stderr are streamed to this process's streams; stderr through a pseudo-terminal when
    this process has a terminal, so the child still draws progress bars (batch jobs: plain lines)."""
    sys.stdout.flush()
    sys.stderr.flush()
    terminal = _isatty(sys.stderr)
    if terminal:
        import pty

        err_read, err_write = pty.openpty()
    else:
        err_read, err_write = os.pipe()
    out_read, out_write = os.pipe()
    process = subprocess.Popen(
        [sys.executable, "-m", "clipit", *argv], stdout=out_write, stderr=err_write, env=child_env(slot)
    )
    os.close(out_write)
    os.close(err_write)
    tail = [""]
    pumps = [
        threading.Thread(target=_pump, args=(out_read, sys.stdout, None), daemon=True),
        threading.Thread(target=_pump, args=(err_read, sys.stderr, tail), daemon=True),
    ]
    for pump in pumps:
        pump.start()
    previous, pending = _forward_signals(process)
    try:
        code = _wait(process)
        for pump in pumps:
            pump.join()
    finally:
        if process.poll() is None:  # the parent itself is stopping: the cell goes with it
            process.kill()
            process.wait()
    _after_signals(previous, pending)
    if code == 0:
        return None
    how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit {code}"
    return f"{how}: {last_error_line(tail[0])}"


def _wait(process: subprocess.Popen) -> int:
    while True:
        try:
            return process.wait()
        except KeyboardInterrupt:  # Ctrl-C reached the child too (same process group): let it stop
            process.wait()
            raise


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def run_chain(cells: list[ChainCell], log=print) -> dict[str, str | None]:
    """Run the cells in order, each in its own process; {label: None if it finished, else why not}.
    A cell whose warm start failed (or was skipped) is skipped; the independent cells still run."""
    outcomes: dict[str, str | None] = {}
    for slot, cell in enumerate(cells):
        blocked = [n for n in cell.needs if outcomes.get(n) is not None]
        if blocked:
            outcomes[cell.label] = f"skipped: its warm start {blocked[0]} did not finish"
        else:
            if is_rank0():
                log(f"[clipit] {cell.label}: clipit {' '.join(cell.argv)}")
            outcomes[cell.label] = run_cell(cell.argv, slot)
        if outcomes[cell.label] is not None and is_rank0():
            log(f"[clipit] {cell.label}: {outcomes[cell.label]}")
    return outcomes


def chain_error(outcomes: dict[str, str | None]) -> CellsFailed | None:
    """One line for a chain with failures: which cell failed and why (its last error line), which
    were skipped, how many finished."""
    bad = {label: why for label, why in outcomes.items() if why is not None}
    if not bad:
        return None
    failed = [f"cell {label} failed ({why})" for label, why in bad.items() if not why.startswith("skipped")]
    skipped = [label for label, why in bad.items() if why.startswith("skipped")]
    return CellsFailed(
        "; ".join(failed)
        + (f"; skipped (warm start did not finish): {', '.join(skipped)}" if skipped else "")
        + f"; {len(outcomes) - len(bad)} of {len(outcomes)} cells finished"
    )
