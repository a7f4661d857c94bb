"""transformers-format CLIPs (PLIP, PathCLIP; clipit/pairing/hf_clip.py): a small random CLIPModel written
with save_pretrained is loaded through the pairing registry as `hf-clip:<name>`, checked against
transformers' own image/text features, and used as the CLIP of the CLIP baselines through the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from clipit.evaluation.export import export_run, load_exported, load_trained_run
from clipit.pairing.encoders import PairingModelError, build_pairing_model
from clipit.pairing.text_tower import text_tower_from
from clipit_testing import TINY, cli, train_args


@pytest.fixture(scope="module")
def tiny_hf_clip(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(small, max_position_embeddings=32),
        vision_config=dict(small, image_size=32, patch_size=8),
        projection_dim=16,
    )
    folder = tmp_path_factory.mktemp("hf-clip") / "tiny-plip"
    CLIPModel(config).eval().save_pretrained(str(folder))
    return folder


def test_hf_clip_embeddings_are_transformers_own(tiny_hf_clip):
    from transformers import CLIPModel

    reference = CLIPModel.from_pretrained(str(tiny_hf_clip), use_safetensors=True).eval()
    pairing = build_pairing_model("hf-clip:tiny", str(tiny_hf_clip), device="cpu")
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tokens = pairing.tokenize(["tumor tissue", "a photo of normal tissue."])
    assert tokens.shape == (2, 32) and pairing.identity["model"] == "hf-clip:tiny" and "sha256" in pairing.identity
    with torch.no_grad():
        vision = reference.visual_projection(reference.vision_model(pixel_values=images).pooler_output)
        text = reference.text_projection(reference.text_model(input_ids=tokens).pooler_output)
    unit = torch.nn.functional.normalize
    torch.testing.assert_close(pairing.encode_images(images), unit(vision, dim=-1))
    torch.testing.assert_close(pairing.encode_texts(["tumor tissue", "a photo of normal tissue."]), unit(text, dim=-1))
    tower = text_tower_from(pairing)  # prompt_ft's / CLIP-IT's trainable text side
    with torch.no_grad():
        torch.testing.assert_close(tower(tokens), unit(text, dim=-1))
    assert "visual" not in dict(tower.clip.named_children())


def test_a_folder_without_safetensors_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(PairingModelError, match=r"no config.json and \*.safetensors for hf-clip:plip"):
        build_pairing_model("hf-clip:plip", str(tmp_path), device="cpu")
    with pytest.raises(PairingModelError, match="hf-clip:plip needs a checkpoint"):
        build_pairing_model("hf-clip:plip", None, device="cpu")


@pytest.mark.parametrize("method", ["zero_shot", "prompt_ft", "clip_probe"])
def test_hf_clip_baselines_train_and_evaluate(method, tiny_hf_clip, tiny_shards, tmp_path):
    extra = ", prompt_loss: infonce" if method == "prompt_ft" else ""
    proc = cli(
        *train_args(
            tmp_path,
            tiny_shards,
            f"methods.{method}={{method: {method}, epochs: 0.5, augment: false{extra}}}",
            "clip.model=hf-clip:tiny",
            f"clip.checkpoint={tiny_hf_clip}",
            "clip.ensemble=logits",
            method=method,
        )
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "runs" / method / "seed-0" / "metrics.json").read_text())
    assert metrics["n"] == 128 and 0 <= metrics["balanced_accuracy"] <= 1
    if method != "clip_probe":
        assert metrics["parameters"]["cached_class_embeddings"] == 4 * 16
    # the export rebuilds the image tower from its recorded transformers config, without the CLIP
    run, out = tmp_path / "runs" / method / "seed-0", tmp_path / "export"
    export_run(run, out)
    assert json.loads((out / "config.json").read_text())["clip_architecture"]["family"] == "hf-clip"
    model, preprocess, _ = load_exported(out)
    reference, _, _, _ = load_trained_run(run)
    images = torch.randint(0, 255, (2, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(preprocess(images))["logits"], reference(preprocess(images))["logits"])


def test_config_accepts_hf_clip_names():
    from clipit.config import load_config

    cfg = load_config(TINY, ["clip.model=hf-clip:plip"])
    assert cfg.clip.model == "hf-clip:plip"


def test_clipit_trains_on_a_clip_vision_tower_backbone(tiny_hf_clip, tiny_shards, tmp_path):
    """model.backbone clip:<pairing model>: the unimodal probe and CLIP-IT warm-started from it run on a
    CLIP's image tower (the reference's CLIP-IT on CONCH/QuiltNet/PLIP/PathCLIP); checkpoints hold what
    training changed, never the tower's base weights, and the export rebuilds the tower without the CLIP."""
    from safetensors.torch import load_file

    from clipit.models.backbones import get_spec

    assert get_spec("clip:hf-clip:plip").arch == "clip"
    sets = [
        "model.backbone=clip:hf-clip:tiny",
        f"model.weights={tiny_hf_clip}",
        "methods.unimodal={method: unimodal, epochs: 1, augment: false}",
        "methods.clipit={method: clipit, warm_start: unimodal, epochs: 0.5, augment: false}",
    ]
    for method in ("unimodal", "clipit"):
        proc = cli(*train_args(tmp_path, tiny_shards, *sets, method=method))
        assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "clipit" / "seed-0"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["n"] == 128 and 0 <= metrics["balanced_accuracy"] <= 1
    saved = load_file(str(run / "best.safetensors"))
    assert saved and all("lora_" in k or not k.startswith("backbone.") for k in saved)
    assert saved["proj.weight"].shape == (512, 16)  # the tower's 16-d joint space -> the 512-d report space
    out = tmp_path / "export"
    export_run(run, out)
    model, preprocess, _ = load_exported(out)
    reference, _, _, _ = load_trained_run(run)
    images = torch.randint(0, 255, (2, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(preprocess(images))["logits"], reference(preprocess(images))["logits"])
