"""Plain training logs for batch jobs: step and validation lines on stdout and in <run>/train.log,
appended across a SIGTERM and the resume, and no progress bar when the output is not a terminal."""

import re
import signal
import subprocess

from clipit_testing import cli, start_frozen_after, train_args, wait_stopped

# 8 steps, a validation and a resume checkpoint every 2, a line every 2
CELL = [
    "methods.unimodal.epochs=2",
    "methods.unimodal.evals_per_epoch=2",
    "methods.unimodal.checkpoint_every=2",
    "methods.unimodal.log_every=2",
]
LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d unimodal seed 0: (.*)$")
STEP = re.compile(
    r"^step (\d+)/8 \(\d+%\) epoch [12]/2 loss \d+\.\d{4} lr 3\.00e-03 images/s \d+\.\d "
    r"data wait \d+\.\d% ETA \S+"
)
VALIDATION = re.compile(
    r"^validation at step (\d+): val loss \d+\.\d{4} val bacc \d+\.\d\d% best val_bacc "
    r"\d+\.\d\d% at step \d+$"
)


def bodies(text: str) -> list[str]:
    return [m.group(1) for line in text.splitlines() if (m := LINE.match(line))]


def test_train_log_has_step_and_validation_lines_and_resume_appends(tiny_shards, tmp_path):
    args = train_args(tmp_path, tiny_shards, *CELL, method="unimodal")
    run = tmp_path / "runs" / "unimodal" / "seed-0"
    # frozen right after its first resume checkpoint (step 2): SIGTERM then reaches a run with steps left
    first = start_frozen_after(
        "clipit.training.training_run:save_training_state",
        1,
        *args,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_stopped(first, 300, "its first checkpoint")
        first.send_signal(signal.SIGTERM)  # checkpoint at the next step boundary, then stop
        first.send_signal(signal.SIGCONT)
        _, stderr = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    before = bodies((run / "train.log").read_text())

    proc = cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "\r" not in proc.stdout and "\r" not in proc.stderr  # not a terminal: no bar
    log = bodies((run / "train.log").read_text())
    assert log[: len(before)] == before  # appended, not truncated
    attempt = log[len(before) :]
    assert bodies(proc.stdout) == attempt  # stdout and train.log carry the same lines
    assert before[0] == "started: 8 steps, 4 per epoch, validation every 2, 1 process"
    resumed = int(re.match(r"resumed at step (\d+): 8 steps", attempt[0]).group(1))
    assert resumed >= 2
    steps = [int(m.group(1)) for body in log if (m := STEP.match(body))]
    validations = [int(m.group(1)) for body in log if (m := VALIDATION.match(body))]
    due = [s for s in range(resumed + 1, 9) if s % 2 == 0]  # a stop signal checkpoints at any step
    assert [s for s in steps if s > resumed] == due
    assert [s for s in validations if s > resumed] == due
    assert 2 in steps and 2 in validations  # the first attempt's lines are kept
    assert attempt[-1].startswith("finished 8 steps in ") and attempt[-1].endswith("(val_bacc)")
    assert "evaluate unimodal on test: 1/1 batches (100%)" in proc.stderr  # evaluation's progress, plain
