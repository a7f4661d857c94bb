import math

import pytest
import torch

from clipit.config import LoraConfig
from clipit.models.backbones import BackboneError, build_backbone
from clipit.models.clipit import (
    ClipItModel,
    VisionClassifier,
    apply_lora,
    clipit_loss,
    lora_target_names,
    set_trainable,
)


def test_loss_matches_hand_computation():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    labels = torch.tensor([0, 1])
    proj = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    text = torch.tensor([[0.0, 2.0], [3.0, 3.0]])
    out = clipit_loss({"logits": logits, "proj": proj}, labels, text, lam=0.5)
    ce0 = -math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(-1)))
    ce1 = -math.log(math.exp(0.5) / (2 * math.exp(0.5) + math.exp(3)))
    kd = ((1 - 0.0) + (1 - 1.0)) / 2  # cos = 0 for the first pair, 1 for the second
    assert out["ce"].item() == pytest.approx((ce0 + ce1) / 2, rel=1e-6)
    assert out["kd"].item() == pytest.approx(kd, abs=1e-6)
    assert out["loss"].item() == pytest.approx((ce0 + ce1) / 2 + 0.5 * kd, rel=1e-6)


def test_loss_without_text_is_plain_cross_entropy():
    logits, labels = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    out = clipit_loss({"logits": logits}, labels, None, lam=1.0)
    assert torch.allclose(out["loss"], torch.nn.functional.cross_entropy(logits, labels))
    assert "kd" not in out


def tiny():
    backbone, spec = build_backbone("demo-vit-tiny")
    return backbone, spec


def test_forward_shapes_and_inference_without_text():
    backbone, spec = tiny()
    model = ClipItModel(backbone, num_classes=4, text_dim=512)
    out = model(torch.randn(2, 3, spec.input_size, spec.input_size))
    assert out["logits"].shape == (2, 4) and out["proj"].shape == (2, 512)
    assert out["vision_logits"].shape == out["text_logits"].shape == (2, 4)


def test_lora_targets_and_trainable_sets():
    backbone, _ = tiny()
    model = ClipItModel(backbone, num_classes=3)
    names = lora_target_names(model, ["Linear", "Conv2d"])
    assert "head" in names and "backbone.patch_embed.proj" in names
    assert not any(n.startswith(("proj", "text_head", "fuse")) for n in names)
    apply_lora(model, LoraConfig(r=4, alpha=8))
    set_trainable(model, "lora", model.pretrained_modules(warm_head=True))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("lora_" in n or n.split(".")[0] in ("proj", "text_head", "fuse") for n in trainable)
    assert any(n.startswith("head.lora_A") for n in trainable)  # the warm-started head carries LoRA too
    assert not any("base_layer" in n for n in trainable)
    # LoRA starts as the identity: B is zero-initialised
    probe = VisionClassifier(tiny()[0], 3)
    set_trainable(probe, "frozen", probe.pretrained_modules(warm_head=False))
    assert [n for n, p in probe.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]


def test_unknown_backbone_and_bad_weights(tmp_path):
    with pytest.raises(BackboneError, match="unknown backbone"):
        build_backbone("resnet9000")
    with pytest.raises(BackboneError, match="not found"):
        build_backbone("demo-vit-tiny", weights=tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    torch.save({"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}, bad)
    with pytest.raises(BackboneError, match="does not fit"):
        build_backbone("demo-vit-tiny", weights=bad)
    good = tmp_path / "good.pt"
    torch.save(tiny()[0].state_dict(), good)
    build_backbone("demo-vit-tiny", weights=good)
