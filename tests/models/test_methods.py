"""Every method's model through models.factory.build_model: shapes, which parameters train under each
fine-tuning mode, warm starts (vision and text), and that one optimiser step moves only those."""

import pytest
import torch
from torch import nn

from clipit.config import ExperimentConfig, LoraConfig, ModelConfig, TrainConfig
from clipit.models.backbones import build_backbone
from clipit.models.baselines import EarlyFusionModel, LateFusionModel, TextClassifier
from clipit.models.checkpoint import save_model
from clipit.models.clipit import clipit_loss, lora_target_names
from clipit.models.factory import build_model

C, D = 3, 16  # classes, text dim


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("CLIPIT_OFFLINE", "1")
    monkeypatch.delenv("CLIPIT_WEIGHTS", raising=False)


def config(**methods) -> ExperimentConfig:
    cfg = ExperimentConfig(
        model=ModelConfig(
            backbone="demo-vit-tiny", text_dim=D, lora=LoraConfig(r=2, alpha=4, targets=["Linear", "Conv2d"])
        )
    )
    cfg.methods = {name: TrainConfig(**kw) for name, kw in methods.items()}
    return cfg


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def tops(names) -> set[str]:
    return {n.split(".")[0] for n in names}


def batch(n=4):
    return torch.randn(n, 3, 64, 64), torch.nn.functional.normalize(torch.randn(n, D), dim=1), torch.arange(n) % C


def test_text_classifier_is_the_reference_text_model():
    model = TextClassifier(D, C)
    assert [type(m) for m in model.text_head] == [nn.Linear, nn.LeakyReLU, nn.Linear]
    assert model.text_head[1].negative_slope == 0.1 and model.text_head[0].out_features == D
    _, text, _ = batch()
    assert model(None, text)["logits"].shape == (4, C)
    with pytest.raises(ValueError, match="needs the paired report"):
        model(None)


def test_fusion_baselines_use_text_at_test_time():
    images, text, _ = batch()
    late = LateFusionModel(build_backbone("demo-vit-tiny")[0], C, D)
    out = late(images, text)
    assert out["logits"].shape == out["vision_logits"].shape == out["text_logits"].shape == (4, C)
    assert late.fuse.in_features == 2 * C and late.needs_text
    early = EarlyFusionModel(build_backbone("demo-vit-tiny")[0], C, D)
    assert early(images, text)["logits"].shape == (4, C)
    assert early.classifier[0].in_features == 96 + D
    for model in (late, early):
        with pytest.raises(ValueError, match="needs the paired report"):
            model(images)


@pytest.mark.parametrize(
    "method,finetune,warm,expected",
    [
        ("unimodal", "auto", False, {"head"}),  # the linear probe
        (
            "unimodal",
            "lora",
            False,
            {"head", "backbone:lora"},
        ),  # LoRA vision-only baseline (fresh head trained in full)
        ("clipit", "auto", True, {"proj", "text_head", "fuse", "backbone:lora", "head:lora"}),
        ("clipit", "frozen", True, {"proj", "text_head", "fuse"}),  # "no LoRA" ablation
        ("clipit", "full", True, {"backbone", "head", "proj", "text_head", "fuse"}),  # full fine-tuning ablation
        ("text", "auto", False, {"text_head"}),
        ("late_fusion", "auto", True, {"text_head", "fuse", "backbone:lora", "head:lora"}),
        ("early_fusion", "auto", True, {"classifier", "backbone:lora"}),
    ],
)
def test_finetune_modes_choose_the_trainable_set(method, finetune, warm, expected):
    cfg = config(m=dict(method=method, finetune=finetune, warm_start="m" if warm else None))
    model, _ = build_model(cfg, cfg.methods["m"], C, D)
    got = set()
    for name in trainable(model):
        top = name.split(".")[0]
        got.add(f"{top}:lora" if "lora_" in name else top)
    assert got == expected
    if finetune == "full":
        assert all(p.requires_grad for p in model.parameters()) and not any(
            "lora_" in n for n, _ in model.named_parameters()
        )


def test_one_step_moves_only_trainable_parameters():
    for method in ("clipit", "late_fusion", "early_fusion", "text"):
        cfg = config(m=dict(method=method, warm_start=None if method == "text" else "m"))
        model, preprocess = build_model(cfg, cfg.methods["m"], C, D)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        images, text, labels = batch()
        out = model(images, text)
        losses = clipit_loss(out, labels, text, lam=1.0)
        assert ("kd" in losses) == (method == "clipit")
        losses["loss"].backward()
        opt.step()
        moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        assert moved and moved <= trainable(model), method
        # LoRA B starts at zero and A gets no gradient on the first step; every other trainable tensor moves
        assert trainable(model) - moved <= {n for n in trainable(model) if "lora_A" in n}, method


def test_warm_starts_copy_backbone_head_and_text_branch(tmp_path):
    cfg = config(
        unimodal=dict(method="unimodal"),
        text=dict(method="text"),
        late_fusion=dict(method="late_fusion", warm_start="unimodal", text_warm_start="text"),
    )
    runs = tmp_path / "runs"
    uni, _ = build_model(cfg, cfg.methods["unimodal"], C, D)
    save_model(runs / "unimodal" / "seed-0" / "best", uni, {"method": "unimodal"}, full=True)
    text, _ = build_model(cfg, cfg.methods["text"], C, D)
    save_model(runs / "text" / "seed-0" / "best", text, {"method": "text"}, full=True)
    late, _ = build_model(cfg, cfg.methods["late_fusion"], C, D, warm_start=runs / "unimodal" / "seed-0" / "best")
    torch.testing.assert_close(late.head.base_layer.weight, uni.head.weight)
    torch.testing.assert_close(late.text_head[0].weight, text.text_head[0].weight)
    torch.testing.assert_close(
        late.backbone.blocks[0].attn.qkv.base_layer.weight, uni.backbone.blocks[0].attn.qkv.weight
    )
    (runs / "text" / "seed-0" / "best.json").unlink()
    with pytest.raises(ValueError, match="text warm start is missing; train text first"):
        build_model(cfg, cfg.methods["late_fusion"], C, D, warm_start=runs / "unimodal" / "seed-0" / "best")


def test_resolved_weights_are_recorded_in_the_config(tmp_path, monkeypatch):
    backbone, _ = build_backbone("demo-vit-tiny")
    torch.save(backbone.state_dict(), tmp_path / "tiny.pt")
    (tmp_path / "w.yaml").write_text("demo-vit-tiny: tiny.pt\n")
    cfg = config(m=dict(method="clipit"))
    cfg.model.weights_file = str(tmp_path / "w.yaml")
    build_model(cfg, cfg.methods["m"], C, D)
    assert cfg.model.weights == str((tmp_path / "tiny.pt").resolve())  # so config.yaml says which file was used
    random_cfg = config(m=dict(method="clipit"))
    build_model(random_cfg, random_cfg.methods["m"], C, D)
    assert random_cfg.model.weights is None  # random init stays None: checkpoints keep the full state


def test_lora_skips_linear_layers_inside_multihead_attention():
    class Pooler(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, kdim=4, vdim=4)
            self.fc = nn.Linear(8, 8)

    model = nn.Module()
    model.backbone = Pooler()
    names = lora_target_names(model, ["Linear"], ("backbone",))
    assert names == ["backbone.fc"]  # MHA reads out_proj.weight directly: an adapter there would never run
