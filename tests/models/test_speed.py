"""GPU speed settings on CPU: gradient checkpointing changes no loss or gradient, unsupported models are one
ConfigError line, fused Adam is chosen only for CUDA parameters, and model.compile trains the tiny demo."""

import json
import types

import pytest
import torch
import torch.nn.functional as F

from clipit.config import ConfigError, LoraConfig, ModelConfig, TrainConfig
from clipit.models.backbones import build_backbone
from clipit.models.clipit import clipit_loss, prepare_finetune
from clipit.models.factory import build_classifier
from clipit.models.speed import apply_speed_settings, enable_gradient_checkpointing
from clipit.training.trainer import make_optimizer, use_fused
from clipit_testing import cli, train_args


def demo_text_tower():
    """The demo CLIP's text tower (open_clip transformer), random weights."""
    import open_clip

    from clipit.pairing.demo_clip import register_demo_clip
    from clipit.pairing.encoders import PairingModel
    from clipit.pairing.text_tower import text_tower_from

    name = register_demo_clip()
    clip = open_clip.create_model(name, pretrained=None)
    return text_tower_from(PairingModel("demo-clip", clip, None, open_clip.get_tokenizer(name), {}), copy=False)


def tiny_clipit(checkpointing: bool, tower: bool = False):
    torch.manual_seed(0)
    backbone, _ = build_backbone("kaiko-vits16-tiny", weights="random")
    model = build_classifier("clipit", backbone, 3, 512, 1)
    if tower:
        model.text_tower = demo_text_tower()
    prepare_finetune(model, "lora", LoraConfig(r=4, alpha=8, targets=["Linear"]), warm_head=True)
    torch.manual_seed(1)
    for name, p in model.named_parameters():  # LoRA B starts at 0: give every adapter a gradient path
        if "lora_B" in name:
            p.data.normal_(0, 0.02)
    apply_speed_settings(model, ModelConfig(backbone="kaiko-vits16-tiny", gradient_checkpointing=checkpointing))
    return model.train()


def loss_and_grads(model, tower: bool = False):
    g = torch.Generator().manual_seed(2)
    images = torch.randn(4, 3, 64, 64, generator=g)
    labels = torch.tensor([0, 1, 2, 1])
    text = F.normalize(torch.randn(4, 512, generator=g), dim=1)
    extra = {"tokens": model.text_tower.tokenize([f"report {i}" for i in range(4)])} if tower else {}
    loss = clipit_loss(model(images, text, **extra), labels, text, lam=1.0)["loss"]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tower", [False, True], ids=["vision", "text-tower"])
def test_gradient_checkpointing_keeps_loss_and_grads(tower):
    loss, grads = loss_and_grads(tiny_clipit(False, tower), tower)
    loss_ckpt, grads_ckpt = loss_and_grads(tiny_clipit(True, tower), tower)
    assert torch.allclose(loss, loss_ckpt, rtol=1e-5, atol=1e-6)
    assert grads.keys() == grads_ckpt.keys()
    assert any("backbone" in n and "lora_A" in n for n in grads)
    if tower:
        assert any(n.startswith("text_tower") and "lora_A" in n for n in grads)
    for name in grads:
        assert torch.allclose(grads[name], grads_ckpt[name], rtol=1e-4, atol=1e-6), name


def test_gradient_checkpointing_is_on_where_asked():
    model = tiny_clipit(True, tower=True)
    assert model.backbone.grad_checkpointing
    blocks = model.text_tower.clip.transformer.resblocks
    assert all(getattr(b, "_clipit_checkpointed", False) for b in blocks)
    assert not any(k.startswith("_orig_mod") for k in model.state_dict())


def test_gradient_checkpointing_unsupported_is_one_line():
    with pytest.raises(ConfigError) as err:
        enable_gradient_checkpointing(torch.nn.Sequential(torch.nn.Linear(2, 2)), "model.gradient_checkpointing: x")
    assert "\n" not in str(err.value) and "gradient_checkpointing: false" in str(err.value)


def test_fused_only_for_cuda_parameters():
    cpu = [torch.nn.Parameter(torch.zeros(2))]
    assert not use_fused(cpu)
    assert not use_fused([])
    on_gpu = types.SimpleNamespace(device=torch.device("cuda", 0), is_floating_point=lambda: True)
    integer_gpu = types.SimpleNamespace(device=torch.device("cuda", 0), is_floating_point=lambda: False)
    assert use_fused([on_gpu, on_gpu])
    assert not use_fused([on_gpu, cpu[0]]) and not use_fused([integer_gpu])
    for name in ("adam", "adamw"):
        opt = make_optimizer(TrainConfig(optimizer=name), [{"params": cpu, "lr": 1e-3}])
        assert not opt.defaults.get("fused")
    if torch.cuda.is_available():
        opt = make_optimizer(TrainConfig(optimizer="adamw"), [torch.nn.Parameter(torch.zeros(2, device="cuda"))])
        assert opt.defaults["fused"]


@pytest.mark.slow
def test_compile_trains_the_tiny_demo(tiny_shards, tmp_path):
    """model.compile: true through the real CLI (inductor on CPU), LoRA so backward runs compiled too."""
    proc = cli(
        *train_args(
            tmp_path,
            tiny_shards,
            "model.compile=true",
            "methods.unimodal.finetune=lora",
            "methods.unimodal.feature_cache=false",
            "methods.unimodal.epochs=1",
            method="unimodal",
        )
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "unimodal" / "seed-0" / "train_summary.json").read_text())
    assert summary["steps"] >= 1
