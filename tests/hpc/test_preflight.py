"""The cluster path as users walk it: `clipit doctor`'s checks before every submission (prepare, grid,
dry runs included), `clipit doctor GRID`, one --root carried into the hints, and grid files that find
the configs they name from any working directory."""

import shutil
from pathlib import Path

import pytest

from clipit.config import ConfigError
from clipit.hpc.grid import expand
from clipit.hpc.grid_file import load_grid
from clipit.hpc.prepare import units_from
from clipit.hpc.requests import PrepareRequest
from clipit_testing import ROOT, cli

TABLE1 = str(ROOT / "configs/grids/paper_table1.yaml")


def test_prepare_dry_run_refuses_naming_each_missing_asset(tmp_path):
    weights = tmp_path / "weights.yaml"
    weights.write_text("kaiko-vits16: random\n")  # a weights file without CONCH
    args = ["prepare", "shards", "--grid", TABLE1, "--pair", "--dry-run", "--root", str(tmp_path / "runs")]
    proc = cli(*args, "--set", f"model.weights_file={weights}", cwd=tmp_path)  # not the repository root
    assert proc.returncode == 2, proc.stderr
    lines = proc.stdout.splitlines()
    for missing in ("data/pcam", "data/bach", "data/crc"):
        assert f"  ✗ data: {missing} not found; fix data.root" in lines
    assert (
        "  ✗ reports: data/tcga/reports.csv not found; fix reports.path (or make it: `clipit prepare reports`)" in lines
    )
    assert any(line.startswith("  ✗ pairing model conch") and "no weights" in line for line in lines)
    assert (
        proc.stderr.startswith("clipit: error: pre-flight: data: data/pcam not found")
        and "Traceback" not in proc.stderr
    )
    assert f"  {tmp_path / 'runs' / 'pcam' / 'shards'}  (config {ROOT / 'configs/grids/base/paper.yaml'}" in proc.stdout
    skipped = cli(*args, "--no-preflight", cwd=tmp_path)
    assert skipped.returncode == 0 and "pre-flight" not in skipped.stdout


def tiny_grid(tmp_path, extra: str = "") -> Path:
    grid = tmp_path / "grids" / "tiny.yaml"
    grid.parent.mkdir(parents=True)
    shutil.copy(ROOT / "configs/demo-tiny.yaml", tmp_path / "exp.yaml")
    grid.write_text(
        "name: tiny\nbase: ../exp.yaml\nroot: runs/tiny\nprofile: local-cluster\nseeds: [0]\n"
        "methods: [unimodal, clipit]\nset: {output_dir: '{root}/{r}'}\n"
        "axes: {r: {r4: {set: {model.lora.r: 4}}, r8: {set: {model.lora.r: 8}}}}\n" + extra
    )
    return grid


def test_grid_refuses_before_submitting_and_its_hint_carries_root_and_set(tmp_path):
    grid, root = tiny_grid(tmp_path), tmp_path / "elsewhere"
    common = ["--config", str(grid), "--root", str(root), "--set", "methods.clipit.lr=0.001"]
    dry = cli("grid", *common, "--dry-run")
    assert dry.returncode == 2, dry.stderr
    hint = f"run `clipit prepare shards --grid {grid} --root {root} --set methods.clipit.lr=0.001` first"
    assert f"✗ shards: {root / 'r4' / 'shards' / 'manifest.json'}: not built; {hint}" in dry.stdout
    assert "would submit 2 tasks (4 cells)" in dry.stdout  # the plan is printed before the refusal
    local = cli("grid", *common, "--local")
    assert local.returncode == 2 and "clipit: error: pre-flight: shards:" in local.stderr
    assert not root.exists()  # refused before anything was queued or written


def test_doctor_checks_every_distinct_config_of_a_grid(tiny_shards, tmp_path):
    sets = "".join(f"  {s.split('=', 1)[0]}: {s.split('=', 1)[1]}\n" for s in tiny_shards)
    grid = tiny_grid(tmp_path).read_text().replace("set: {output_dir: '{root}/{r}'}\n", "")
    path = tmp_path / "grids" / "tiny.yaml"
    path.write_text(grid + "set:\n  output_dir: '{root}/{r}'\n" + sets)
    ok = cli("doctor", str(path), "--root", str(tmp_path / "runs"))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "grid tiny: 4 cells, 2 distinct config(s)" in ok.stdout and ok.stdout.endswith("all checks passed\n")
    assert ok.stdout.count("✓ backbone demo-vit-tiny: output width") == 1  # each check once per distinct input
    bad = cli("doctor", str(path), "--set", f"model.weights={tmp_path / 'missing.safetensors'}")
    assert bad.returncode == 2 and "✗ backbone demo-vit-tiny" in bad.stdout and "missing.safetensors" in bad.stdout
    shipped = cli("doctor", "configs/grids/paper_table1.yaml")
    assert shipped.returncode == 2 and "unknown key" not in shipped.stdout + shipped.stderr
    assert "grid paper_table1: 216 cells, 18 distinct config(s)" in shipped.stdout


def test_grid_files_name_configs_relative_to_their_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the repository root
    assert load_grid(TABLE1).base == str(ROOT / "configs/grids/base/paper.yaml")
    plan = expand(tiny_grid(tmp_path / "a"))
    assert {c.config for c in plan.cells} == {str(tmp_path / "a" / "exp.yaml")}
    assert plan.root == str(tmp_path / "runs" / "tiny")  # data and output paths: the working directory
    old_style = tmp_path / "a" / "grids" / "old.yaml"
    old_style.write_text("name: old\nbase: a/exp.yaml\n")  # written relative to the working directory
    with pytest.raises(ConfigError, match="relative to the grid file's folder: write base: ../exp.yaml"):
        load_grid(old_style)


def test_prepare_takes_the_grid_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    grid = str(tiny_grid(tmp_path))
    pairing, shards = units_from(PrepareRequest(stage="shards", grid=grid, root=str(tmp_path / "r")))
    assert [u.dir for u in shards] == [str(tmp_path / "r" / v / "shards") for v in ("r4", "r8")]
    assert [u.dir for u in pairing] == [str(tmp_path / "r" / v / "pairing") for v in ("r4", "r8")]
