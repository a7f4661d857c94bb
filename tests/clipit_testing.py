"""Shared helpers for tests that run the real CLI."""

import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = "configs/demo-tiny.yaml"


def run_clipit(*args, timeout=600, **kwargs):
    """The real `clipit` CLI in a fresh process (what users and SLURM jobs run)."""
    return subprocess.run(
        [sys.executable, "-m", "clipit", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, **kwargs
    )


def shard_copy(tiny_shards: list[str], tmp_path: Path) -> Path:
    """A private copy of the tiny demo's shard set (the session's own set is shared: never write into it)."""
    src = Path(next(o.split("=", 1)[1] for o in tiny_shards if o.startswith("shards.dir=")))
    dst = tmp_path / "shards"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("features"))
    return dst


def with_shards(overrides: list[str], shard_dir: Path) -> list[str]:
    """`overrides` with shards.dir pointing at `shard_dir`."""
    return [o for o in overrides if not o.startswith("shards.dir=")] + [f"shards.dir={shard_dir}"]


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
