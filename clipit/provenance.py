"""Where a result came from: the facts every run directory records in provenance.json (clipit/layout.py) and
every export carries in its config.json and model card.

    clipit       version, git commit and dirty flag (when clipit runs from a git checkout)
    config       sha256 of the fully resolved config (canonical JSON)
    weights      sha256 of every local weights file the run read (backbone, pairing model, warm start)
    data         sha256 of the training shards (train + val splits, embedding, texts: the trainer's
                 `training_shards`)
    transform    input size, normalisation, resize rule, augmentation; precision
    device       type and name (e.g. cuda / NVIDIA H100 80GB HBM3), process count, host
    software     python and the versions of the packages that shape a result

Hashing a multi-GB checkpoint takes seconds to minutes, so a file's sha256 is cached on disk by (path,
size, mtime): a grid of seeds hashes its backbone once. `read_provenance(run_dir)` is the reader.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

from clipit import layout
from clipit.io import atomic_write_json, sha256_file

# distributions whose versions can change a result (deepspeed only when installed)
PACKAGES = (
    "torch",
    "timm",
    "peft",
    "accelerate",
    "open_clip_torch",
    "webdataset",
    "numpy",
    "safetensors",
    "transformers",
    "deepspeed",
)
FORMAT = "clipit-provenance"
VERSION = 1


def package_versions() -> dict[str, str]:
    """Installed versions of PACKAGES (those not installed are left out)."""
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def clipit_version() -> str:
    try:
        return importlib.metadata.version("clipit")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree (PYTHONPATH) without installing
        return "unknown"


def git_state(where: str | Path | None = None) -> dict | None:
    """{"commit", "dirty"} of the git checkout that holds the clipit package, None outside one (an installed
    wheel) or without git. Dirty counts changes to tracked files only (run folders inside the tree are not)."""
    where = Path(where) if where else Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", str(where), *args], capture_output=True, text=True, timeout=10, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return None
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def config_sha256(config: dict) -> str:
    """sha256 of a config as canonical JSON (sorted keys): equal configs give equal hashes."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def _hash_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "clipit" / "sha256"


def cached_sha256(path: str | Path) -> str:
    """sha256 of a file, read from the on-disk cache while its (path, size, mtime) is unchanged."""
    path = Path(path).resolve()
    st = path.stat()
    stamp = {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    entry = _hash_cache_dir() / (hashlib.sha256(str(path).encode()).hexdigest()[:32] + ".json")
    try:
        cached = json.loads(entry.read_text())
        if {k: cached.get(k) for k in stamp} == stamp and isinstance(cached.get("sha256"), str):
            return cached["sha256"]
    except (OSError, ValueError, AttributeError):
        pass
    digest = sha256_file(path)
    try:
        atomic_write_json(entry, stamp | {"sha256": digest})
    except Exception:  # a read-only home only costs the next run a re-hash
        pass
    return digest


def weights_sha256(path: str | Path) -> str | None:
    """sha256 of a local weights file; a folder (a CLIP's checkpoint folder) hashes its files' hashes in
    name order; None when the path is not on disk (a hub ID, `random`)."""
    path = Path(path)
    if path.is_file():
        return cached_sha256(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        listing = [(str(p.relative_to(path)), cached_sha256(p)) for p in files]
        return hashlib.sha256(json.dumps(listing).encode()).hexdigest()
    return None


def device_record(device, processes: int = 1) -> dict:
    """The device type and name the run computed on, and how many processes."""
    kind = getattr(device, "type", str(device))
    name = _cpu_name()
    if kind == "cuda":
        import torch

        name = torch.cuda.get_device_name(device)
    return {"type": kind, "name": name, "processes": int(processes)}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _command() -> str | None:
    if not sys.argv:
        return None
    program = Path(sys.argv[0]).name
    return " ".join(["clipit" if program in ("__main__.py", "clipit") else program, *sys.argv[1:]])


def collect(
    *,
    config: dict,
    device,
    processes: int = 1,
    weights: dict[str, str | Path | None] | None = None,
    data_sha256: str | None = None,
    transform: dict | None = None,
    precision: str | None = None,
) -> dict:
    """One provenance record; `weights` maps a role (backbone, pairing, warm_start) to the location the run
    read it from (kept as given; hashed when it is a local file or folder)."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "clipit": {"version": clipit_version(), "git": git_state()},
        "config_sha256": config_sha256(config),
        "weights": {
            role: {
                "location": None if where is None else str(where),
                "sha256": weights_sha256(where) if where else None,
            }
            for role, where in (weights or {}).items()
        },
        "data": {"training_shards_sha256": data_sha256},
        "transform": transform or {},
        "precision": precision,
        "device": device_record(device, processes),
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": package_versions(),
        "command": _command(),
    }


def write_provenance(run_dir: str | Path, record: dict) -> Path:
    """Write `record` as the run's provenance.json. A resumed run keeps what its earlier attempts ran on
    (under `earlier`) when that differs: a run finished on another machine or commit says so."""
    path = layout.provenance_file(run_dir)
    earlier = []
    previous = read_provenance(run_dir)
    if previous is not None:
        earlier = previous.pop("earlier", [])
        if _machine(previous) != _machine(record):
            earlier.append(previous)
    atomic_write_json(path, record | ({"earlier": earlier} if earlier else {}))
    return path


def _machine(record: dict) -> tuple:
    keys = ("clipit", "config_sha256", "weights", "data", "device", "host", "python", "packages")
    return tuple(json.dumps(record.get(k), sort_keys=True) for k in keys)


def read_provenance(run_dir: str | Path) -> dict | None:
    """The run's provenance record; None when it has none (a run from before provenance was recorded) or
    the file is not a JSON object."""
    try:
        record = json.loads(layout.provenance_file(run_dir).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def summary_line(record: dict) -> str:
    """One line for footnotes and model cards: clipit version@commit, torch/timm, device, precision."""
    git = (record.get("clipit") or {}).get("git") or {}
    commit = git.get("commit", "")[:12] + ("+dirty" if git.get("dirty") else "") if git else "no git checkout"
    pkgs = record.get("packages") or {}
    device = record.get("device") or {}
    return (
        f"clipit {(record.get('clipit') or {}).get('version', '?')} ({commit}), torch {pkgs.get('torch', '?')}, "
        f"timm {pkgs.get('timm', '?')}, python {record.get('python', '?')}, {device.get('processes', 1)} x "
        f"{device.get('type', '?')} {device.get('name', '')}".rstrip()
        + f", precision {record.get('precision') or '?'}"
    )
