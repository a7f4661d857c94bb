"""bench/gpu_check.py's CPU dry path: every section runs at tiny sizes and writes its table and numbers, so the
GPU check cannot rot between the runs on a lent GPU; a dry-run's numbers never stand in for a measurement."""

import json
import subprocess
import sys

import pytest

from clipit.config import ConfigError
from clipit.hpc.throughput import load_throughput
from clipit_testing import ROOT


def gpu_check(tmp_path, *sections):
    out = tmp_path / "gpu-check.md"
    cmd = [sys.executable, "bench/gpu_check.py", "--dry-run", "--out", str(out)]
    proc = subprocess.run(
        cmd + (["--sections", *sections] if sections else []), cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out.read_text(), json.loads(out.with_suffix(".json").read_text())


def test_dry_run_of_the_quick_sections(tmp_path):
    table, data = gpu_check(tmp_path, "conch", "search", "loader")
    assert data["dry_run"] and "dry run" in table.splitlines()[0]
    assert data["conch"]["images_per_s"] > 0 and data["loader"]["samples_per_s"] > 0
    assert data["search"]["top1_agreement"] == 1.0  # torch and faiss return the same top-1
    assert "| pairing encoder |" in table and "| top-k search |" in table and "| shard loader |" in table
    with pytest.raises(ConfigError, match="dry-run"):  # tiny CPU numbers never price a grid
        load_throughput(tmp_path / "gpu-check.md")


@pytest.mark.slow  # six tiny training setups (three with CONCH's text tower): ~50 s on 2 idle cores
def test_dry_run_of_the_train_section(tmp_path):
    table, data = gpu_check(tmp_path, "train")
    rows = data["train_step"]
    assert [(r["label"], r["text_tower"]) for r in rows] == [
        (label, tower) for label in ("ViT-S/16", "ViT-B/16", "ViT-L/16 (UNI)") for tower in (False, True)
    ]
    assert all(r["images_per_s"] > 0 and r["step_flops"] > 0 for r in rows)
    assert all(r["forward_images_per_s"] > 0 for r in rows if not r["text_tower"])
    assert table.count("| train step |") == 6 and table.count("| frozen forward |") == 3


@pytest.mark.slow
def test_dry_run_with_ddp_and_zero2(tmp_path):
    table, data = gpu_check(tmp_path, "ddp")
    assert data["ddp_zero2"]["same_metrics"], data["ddp_zero2"]
    assert "DDP vs DeepSpeed ZeRO-2" in table
