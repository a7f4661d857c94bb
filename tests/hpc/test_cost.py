"""The grid's cost before launch (clipit/hpc/cost.py, throughput.py): the paper grid's dry-run table with
totals, a tiny grid's counts and GPU-hours against a hand computation, the FLOP formula against torch's
counter, and a measurement file replacing the assumptions."""

import json

import pytest
import torch
import yaml
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from clipit.config import ConfigError
from clipit.hpc.cluster import load_profile
from clipit.hpc.cost import cost_lines, grid_cost
from clipit.hpc.grid import expand
from clipit.hpc.submit import print_cost
from clipit.hpc.throughput import ASSUMED, backbone_flops, load_throughput, pairing_flops, vit_flops
from clipit_testing import ROOT, cli


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(ROOT)  # grid paths are relative to the launch directory


def test_paper_table1_dry_run_prints_the_cost_with_totals():
    plan = expand(ROOT / "configs" / "grids" / "paper_table1.yaml")
    lines = []
    print_cost(plan, load_profile(plan.grid.profile, plan.grid.resources), out=lines.append)
    assert lines[0].startswith("cost before launch (throughput assumed")
    rows = [line for line in lines if line.startswith("backbone=")]
    assert len(rows) == len(plan.cells) == 216
    assert sum(line.startswith("pairing ") for line in lines) == 3  # one per dataset, shared by the backbones
    total = lines[-1].split()
    assert lines[-1].startswith("total (219 stages)")
    no_cache, cache = float(total[-2]), float(total[-1])
    assert 0 < cache < no_cache  # the probes' train/val passes collapse into one cache build per backbone
    uni_probe = next(r for r in rows if r.startswith("backbone=uni,dataset=pcam,method=unimodal,seed=0"))
    # PCAM, 3 epochs at batch 64 = 12,288 steps; 31 validations of 32,768; the test split
    assert uni_probe.split()[-5] == f"{12288 * 64 + 31 * 32768 + 32768:,}"
    assert uni_probe.split()[-4] == f"{262144 + 32768 + 32768:,}"


def tiny_grid(tmp_path, **extra):
    grid = {
        "name": "tiny-cost",
        "base": str(ROOT / "configs/demo-tiny.yaml"),
        "root": str(tmp_path / "grid"),
        "seeds": [0, 1],
        "set": {"output_dir": "{root}/out"},
    } | extra
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return expand(path)


def test_tiny_grid_matches_a_hand_computation(tmp_path):
    """demo-tiny: 256/64/128 images; unimodal 2 epochs at batch 64 (frozen, unaugmented: feature cache),
    clipit 1 epoch, 2 validations per epoch, LoRA, cached text; one process; bf16 at the measured rates."""
    measured = tmp_path / "gpu-check.json"
    measured.write_text(
        json.dumps(
            {
                "device": "test",
                "peak_flops": 1e15,
                "loader_samples_per_s": 1e12,
                "train_step": [
                    {
                        "backbone": "demo-vit-tiny",
                        "text_tower": False,
                        "images_per_s": 1000.0,
                        "forward_images_per_s": 4000.0,
                        "mfu": 0.5,
                        "forward_mfu": 0.5,
                    }
                ],
            }
        )
    )
    throughput = load_throughput(measured.with_suffix(".md"))
    bf16 = {"methods.unimodal.precision": "bf16", "methods.clipit.precision": "bf16"}  # gpu-check measures bf16
    stages = grid_cost(tiny_grid(tmp_path, set={"output_dir": "{root}/out"} | bf16))
    assert [s.label.split(",")[0] for s in stages][1:] == ["method=unimodal"] + ["method=clipit"] + [
        "method=unimodal"
    ] + ["method=clipit"]
    pairing, probe0, clipit0, probe1, clipit1 = stages
    assert pairing.images(False) == 256 + 64 + 128 and pairing.texts(False) == 120
    # probe: 4 batches/epoch x 2 epochs = 8 steps x 64; validations at steps 4, 8 (2 x 64); test 128
    assert probe0.images(False) == probe1.images(False) == 8 * 64 + 2 * 64 + 128
    assert probe0.images(True) == 256 + 64 + 128 and probe1.images(True) == 128  # the cache is built once
    assert "+cache build" in probe0.label and "+cache build" not in probe1.label
    # clipit: 4 steps x 64; validations at steps 2 and 4; test 128; same with and without the cache
    assert clipit0.images(False) == clipit0.images(True) == 4 * 64 + 2 * 64 + 128
    hours = lambda s: s.gpu_hours(throughput, False) * 3600  # noqa: E731 - GPU-seconds
    assert hours(clipit0) == pytest.approx(256 / 1000 + (128 + 128) / 4000)
    assert hours(probe0) == pytest.approx(768 / 4000)
    assert probe0.gpu_hours(throughput, True) * 3600 == pytest.approx(448 / 4000)
    image, text = pairing_flops("demo-clip")  # demo-clip pairs in fp32: 67 TFLOP/s x the file's MFU
    assert hours(pairing) == pytest.approx((448 * image + 120 * text) / (67e12 * 0.5))
    lines = cost_lines(stages, throughput)
    assert lines[0].startswith(f"cost before launch (throughput measured: {measured}")
    assert lines[-1].split()[-5:-2] == [f"{448 + 2 * 768 + 2 * 512:,}", f"{448 + 448 + 128 + 2 * 512:,}", "120"]


def test_text_tower_counts_train_and_val_reports(tmp_path):
    plan = tiny_grid(
        tmp_path,
        methods=["unimodal", "clipit"],
        seeds=[0],
        set={"output_dir": "{root}/out", "methods.clipit.text_encoder": "tower"},
    )
    clipit = next(s for s in grid_cost(plan) if "method=clipit" in s.label)
    assert clipit.texts(False) == 4 * 64 + 2 * 64


def test_vit_formula_matches_torch_flop_counter():
    from clipit.models.backbones import build_backbone

    model, spec = build_backbone("kaiko-vitb16-tiny", weights="random")
    # the math attention kernel: FlopCounterMode counts its matmuls (not CPU's fused kernel)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(torch.zeros(1, 3, spec.input_size, spec.input_size))
    assert backbone_flops("kaiko-vitb16-tiny") == pytest.approx(counter.get_total_flops(), rel=0.02)
    assert vit_flops(12, 384, 197, 256, 1) == pytest.approx(9.197e9, rel=0.01)  # ViT-S/16, FlopCounterMode: 9.197 G


def test_throughput_defaults_and_bad_files(tmp_path):
    assumed = load_throughput(None, cpus=4)
    assert assumed.source.startswith("assumed") and assumed.loader_per_s == ASSUMED["loader_per_core"] * 4
    with pytest.raises(ConfigError, match="gpu-check results not found"):
        load_throughput(tmp_path / "missing.md")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="not a gpu-check result"):
        load_throughput(tmp_path / "bad.json")


@pytest.mark.slow
def test_launcher_dry_run_prints_the_cost():
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "launchers/grid.py", "--config", "configs/grids/demo.yaml", "--dry-run", "--no-preflight"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "cost before launch" in proc.stdout and "\ntotal (" in proc.stdout
    assert (
        cli("grid", "--config", "configs/grids/demo.yaml", "--dry-run", "--no-preflight").stdout.count("cost before")
        == 1
    )


def test_unknown_split_sizes_leave_the_plan_standing(tmp_path):
    plan = tiny_grid(
        tmp_path,
        methods=["unimodal"],
        seeds=[0],
        set={
            "output_dir": "{root}/out",
            "data.name": "folder",
            "data.root": str(tmp_path / "images"),
            "reports.path": str(tmp_path / "reports.jsonl"),
        },
    )
    lines = []
    print_cost(plan, load_profile("local-cluster"), out=lines.append)
    assert len(lines) == 1 and lines[0].startswith("cost: not estimated (data.expected_sizes:"), lines
