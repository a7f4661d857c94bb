"""Training progress for people and clusters: plain lines on rank 0, to stdout and `<run>/train.log`.

Every `log_every` steps (and at the last step) one line; one at every validation; one per epoch with the
samples its batches held (training/coverage.py); one when an attempt starts and when it finishes:

    2025-01-31 12:00:00 clipit seed 0: step 50/400 (12%) epoch 1/4 loss 1.2345 lr 1.00e-03 images/s 812.5 data wait 3.1% ETA 0:04:10
    2025-01-31 12:00:09 clipit seed 0: validation at step 100: val loss 0.9876 val bacc 61.23% best val_loss 0.9876 at step 100
    2025-01-31 12:00:09 clipit seed 0: epoch 1/4 coverage: 6400/6437 training samples seen (99.4%), none drawn twice, 37 not drawn; 8.91 of 9 classes per batch (a random batch: 8.93)

loss is rank 0's mean over the steps since the previous line; images/s counts every rank; data wait
is the share of that time rank 0 waited for its loader; ETA extrapolates this attempt's pace
(validation included). train.log is appended to, so a resumed run keeps the lines of every attempt.
A tqdm bar (stderr) is drawn only when stderr is a terminal (clipit/progress.py).
"""

from __future__ import annotations

import time
from pathlib import Path

from clipit import layout
from clipit.progress import Progress, format_duration, is_terminal
from clipit.training.coverage import coverage_line


class TrainLog:
    def __init__(
        self, run_dir: Path, name: str, total_steps: int, batches_per_epoch: int, every: int, step: int, main: bool
    ):
        self.name, self.total, self.per_epoch, self.every, self.main = name, total_steps, batches_per_epoch, every, main
        # a bar on a terminal only: in a batch job the lines are the progress
        self.bar = (
            Progress(total=total_steps, initial=step, desc=name, unit="step", bar=True)
            if main and is_terminal()
            else None
        )
        self.path = layout.train_log(run_dir)
        self._start_step, self._start = step, time.monotonic()
        self._reset()

    def _reset(self) -> None:
        self._loss, self._steps, self._images, self._waited, self._since = 0.0, 0, 0, 0.0, time.monotonic()

    def line(self, text: str) -> None:
        """One line to stdout and train.log (rank 0; other ranks write nothing)."""
        if not self.main:
            return
        stamped = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {self.name}: {text}"
        if self.bar is not None:
            self.bar.write(stamped)
        else:
            print(stamped, flush=True)
        with open(self.path, "a", encoding="utf-8") as file:  # opened per line: every line is on disk at once
            file.write(stamped + "\n")

    def start(self, resumed_from: int | None, world: int, eval_every: int) -> None:
        began = f"resumed at step {resumed_from}" if resumed_from is not None else "started"
        self.line(
            f"{began}: {self.total} steps, {self.per_epoch} per epoch, validation every {eval_every}, "
            f"{world} process{'es' if world > 1 else ''}"
        )

    def step(self, step: int, loss, lr: float, images: int, waited: float) -> None:
        """After optimizer step `step`: `loss` (a tensor; read only when a line is due), global images
        of the step and seconds rank 0 waited for the batch."""
        if not self.main:
            return
        self._loss = self._loss + loss.detach()  # stays on the device until a line is due: no sync per step
        self._steps, self._images, self._waited = self._steps + 1, self._images + images, self._waited + waited
        if self.bar is not None:
            self.bar.update(1)
        if step % self.every and step != self.total:
            return
        now = time.monotonic()
        window, elapsed = max(now - self._since, 1e-9), now - self._start
        done = step - self._start_step
        eta = format_duration(elapsed / done * (self.total - step)) if done else "?"
        epochs = -(-self.total // self.per_epoch)
        self.line(
            f"step {step}/{self.total} ({100 * step / self.total:.0f}%) epoch {(step - 1) // self.per_epoch + 1}"
            f"/{epochs} loss {float(self._loss) / self._steps:.4f} lr {lr:.2e} images/s "
            f"{self._images / window:.1f} data wait {100 * self._waited / window:.1f}% ETA {eta}"
        )
        self._reset()

    def validation(self, step: int, val: dict, best_score: float | None, best_step: int, select: str) -> None:
        if not self.main:
            return
        best = (
            "last" if select == "last" else f"{-best_score:.4f}" if select == "val_loss" else f"{100 * best_score:.2f}%"
        )
        self.line(
            f"validation at step {step}: val loss {val['loss']:.4f} val bacc "
            f"{100 * val['balanced_accuracy']:.2f}% best {select} {best} at step {best_step}"
        )

    def coverage(self, record: dict | None) -> None:
        """One line per epoch: the samples its batches held and their class mix (training/coverage.py)."""
        if record is not None:
            self.line(coverage_line(record, -(-self.total // self.per_epoch)))

    def finish(self, summary: dict) -> None:
        stopped = summary.get("stopped_early_at_step")
        end = f"stopped early at step {stopped}" if stopped else f"finished {summary['steps']} steps"
        self.line(
            f"{end} in {format_duration(time.monotonic() - self._start)}; best checkpoint at step "
            f"{summary['best_step']} ({summary['select']})"
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
