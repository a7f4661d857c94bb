"""Shared helpers for tests that run the real CLI."""
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = "configs/demo-tiny.yaml"


def run_clipit(*args, timeout=600, **kwargs):
    """The real `clipit` CLI in a fresh process (what users and SLURM jobs run)."""
    return subprocess.run([sys.executable, "-m", "clipit", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, **kwargs)




def train_args(out: Path, shards: list[str], *extra: str, method: str = "clipit", seed: int = 0) -> list[str]:
    sets = [f"output_dir={out}", *shards, *extra]
    return ["train", "--config", TINY, "--method", method, "--seed", str(seed)] + [a for s in sets for a in ("--set", s)]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.3):
    """Poll `predicate` until it returns something truthy (returned) or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
