"""Preemption-safe stopping: SIGTERM/SIGUSR2 set a flag; the trainer saves at the next step boundary.

Saving inside a signal handler could catch the model between backward and optimizer step. After
the save, the previously installed handler runs: under submitit that is its own USR2 handler
(requeue + exit), elsewhere the default action ends the process.
"""

from __future__ import annotations

import signal
import sys

import torch

from clipit.training.accel import any_rank

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)


class GracefulStop:
    def __init__(self, signals=STOP_SIGNALS):
        self.pending: int | None = None
        self.previous = {}
        self.signals = signals
        self._install()

    def _install(self) -> None:
        for sig in self.signals:
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a notebook worker): no signal handling
                pass

    def _handle(self, signum, frame):
        self.pending = signum

    def requested(self, device: torch.device) -> bool:
        """True on every rank if any rank got a stop signal (ranks must stop at the same step)."""
        return self.poll(device)[0]

    def poll(self, device: torch.device, *flags: bool | torch.Tensor) -> tuple[bool, ...]:
        """(stop requested, *flags), each true on every rank if true on any rank, in one collective: the
        trainer adds its per-step checks (a non-finite loss) to the stop signal's all-reduce."""
        stop, *rest = any_rank(device, self.pending is not None, *flags)
        if stop and self.pending is None:
            self.pending = signal.SIGTERM
        return (stop, *rest)

    def finish(self) -> None:
        """Hand the signal to whoever handled it before us (after our checkpoint is on disk)."""
        signum = self.pending
        previous = self.previous.get(signum, signal.SIG_DFL)
        self.restore()
        if callable(previous):
            previous(signum, None)  # submitit: requeue and sys.exit; its SIGTERM "bypass" returns
        elif previous != signal.SIG_IGN:
            sys.exit(128 + int(signum))
        self.pending = None  # the process lives on: keep listening
        self._install()

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}
