"""The eva-protocol probe grid and the CLIP-baseline grid ship the recipes they claim: kaiko eva 0.1.0's
per-dataset offline probe (configs/vision/pathology/offline/classification/{bach,crc,patch_camelyon}.yaml)
with CLIP-IT warm-started from it, and every CLIP the paper compares against under the reference recipe."""

from clipit.hpc.grid import expand
from clipit.training.trainer import step_plan
from clipit_testing import ROOT, cli

EVA = ROOT / "configs/grids/paper_eva_probe.yaml"
CLIP = ROOT / "configs/grids/paper_clip_baselines.yaml"

# eva 0.1.0: dataset -> (batch, lr, early-stopping patience; BACH's 256 capped at clipit's 254-image split); SGD momentum 0.9 (no Nesterov), wd 0,
# cosine to 0 over 12,500 steps, monitor val accuracy
EVA_RECIPES = {"bach": (254, 6.25e-4, 400), "crc": (4096, 0.01, 24), "pcam": (4096, 0.01, 9)}
TRAIN = {"bach": 254, "crc": 80_000, "pcam": 262_144}  # clipit's train splits


def test_eva_probe_grid_follows_eva_per_dataset_and_warm_starts_clipit_from_it():
    plan = expand(EVA)
    probes = [c for c in plan.cells if c.method == "eva_probe"]
    assert len(probes) == 6 * 3 * 3
    for cell in probes:
        cfg = cell.load()
        m = cfg.methods["eva_probe"]
        batch, lr, patience = EVA_RECIPES[cfg.data.name]
        assert (m.batch_size, m.lr, m.patience) == (batch, lr, patience), cfg.data.name
        assert (m.optimizer, m.nesterov, m.momentum, m.weight_decay) == ("sgd", False, 0.9, 0.0)
        assert (m.schedule, m.min_lr, m.select, m.evals_per_epoch) == ("cosine", 0.0, "val_acc", 1)
        manifest = {"splits": {"train": {"count": TRAIN[cfg.data.name]}}}
        assert step_plan(manifest, m, 1).total_steps == 12_500, cfg.data.name
    clipit = [c for c in plan.cells if c.method == "clipit"]
    assert len(clipit) == len(probes)
    for cell in clipit:
        assert cell.warm_start == "eva_probe" and cell.warm_start_link.endswith(f"runs/eva_probe/seed-{cell.seed}")
        assert cell.load().methods["clipit"].text_encoder == "tower"  # Table 1's CLIP-IT otherwise


def test_clip_baseline_grid_has_every_clip_under_the_reference_recipe():
    plan = expand(CLIP)
    rows = {}
    for cell in plan.cells:
        rows.setdefault(cell.labels["clip"], set()).add(cell.method)
    assert rows == {
        c: {"zero_shot", "prompt_ft", "clip_probe", "clipit"} for c in ("conch", "quiltnet-b32", "pathclip", "plip")
    }
    templates = {}
    for cell in plan.cells:
        cfg = cell.load()
        assert cfg.clip.ensemble == "logits" and cfg.methods["prompt_ft"].prompt_loss == "infonce"
        assert cfg.model.backbone == f"clip:{cfg.clip.model}" and cfg.methods["clipit"].warm_start is None
        templates[cell.labels["clip"]] = len(cfg.clip.templates or [None] * 22)
    assert templates == {"conch": 22, "quiltnet-b32": 4, "pathclip": 4, "plip": 1}


def test_both_grids_dry_run_through_the_cli():
    for grid in (EVA, CLIP):
        proc = cli("grid", "--config", str(grid), "--dry-run", "--no-preflight")
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "cells" in proc.stdout
