"""provenance.json: the facts of a run (clipit/provenance.py), the on-disk sha256 cache of weights files,
the git state of a checkout, and a resumed run that keeps what its earlier attempt ran on."""

import json
import os
import shutil
import subprocess

import pytest

from clipit import layout
from clipit.provenance import (
    cached_sha256,
    collect,
    git_state,
    read_provenance,
    summary_line,
    weights_sha256,
    write_provenance,
)


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_weights_hash_is_cached_by_path_size_and_mtime(tmp_path, cache_home):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"a" * 1000)
    first = cached_sha256(weights)
    [entry] = (cache_home / "clipit" / "sha256").glob("*.json")
    stored = json.loads(entry.read_text())
    entry.write_text(json.dumps(stored | {"sha256": "from-the-cache"}))
    assert cached_sha256(weights) == "from-the-cache"  # unchanged file: not read again
    weights.write_bytes(b"b" * 1000)  # same size, new mtime: hashed again
    os.utime(weights, ns=(stored["mtime_ns"] + 10**9, stored["mtime_ns"] + 10**9))
    assert cached_sha256(weights) not in (first, "from-the-cache")
    assert weights_sha256(tmp_path / "not-there") is None and weights_sha256("hf-hub:MahmoodLab/uni") is None
    (tmp_path / "clip").mkdir()
    shutil.copy(weights, tmp_path / "clip" / "model.safetensors")
    assert len(weights_sha256(tmp_path / "clip")) == 64  # a checkpoint folder: hashed over its files


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_git_state_reports_commit_and_dirty_flag(tmp_path):
    assert git_state(tmp_path) is None  # not a checkout (an installed wheel)

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    clean = git_state(tmp_path)
    assert len(clean["commit"]) == 40 and clean["dirty"] is False
    (tmp_path / "untracked.txt").write_text("runs are not code")
    assert git_state(tmp_path)["dirty"] is False
    (tmp_path / "a.py").write_text("x = 2\n")
    assert git_state(tmp_path) == {"commit": clean["commit"], "dirty": True}


def test_record_names_versions_device_and_hashes(tmp_path):
    weights = tmp_path / "backbone.pt"
    weights.write_bytes(b"w")
    record = collect(
        config={"b": 1, "a": [2]},
        device="cpu",
        weights={"backbone": weights, "pairing": "hf-hub:x/y"},
        data_sha256="d" * 64,
        precision="bf16",
    )
    assert record["config_sha256"] == collect(config={"a": [2], "b": 1}, device="cpu")["config_sha256"]
    assert record["weights"]["backbone"]["sha256"] == cached_sha256(weights)
    assert record["weights"]["pairing"] == {"location": "hf-hub:x/y", "sha256": None}
    assert {"torch", "timm", "peft", "accelerate", "numpy", "webdataset", "open_clip_torch"} <= set(record["packages"])
    assert record["device"]["type"] == "cpu" and record["device"]["name"] and record["python"]
    line = summary_line(record)
    assert "torch " + record["packages"]["torch"] in line and "precision bf16" in line


def test_resumed_run_keeps_its_earlier_machine(tmp_path):
    run = tmp_path / "runs" / "clipit" / "seed-0"
    assert read_provenance(run) is None
    first = collect(config={}, device="cpu")
    write_provenance(run, first)
    write_provenance(run, collect(config={}, device="cpu"))  # the same machine again: nothing kept twice
    assert "earlier" not in read_provenance(run)
    moved = collect(config={}, device="cpu") | {"host": "another-node"}
    write_provenance(run, moved)
    record = read_provenance(run)
    assert record["host"] == "another-node" and [e["host"] for e in record["earlier"]] == [first["host"]]
    assert layout.provenance_file(run) == run / "provenance.json"
    layout.provenance_file(run).write_text("[1, 2]")
    assert read_provenance(run) is None
