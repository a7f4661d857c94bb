"""The CLIP-IT classifier (method.md Stage 4), its unimodal warm start (Stage 0), and how each
method's parameters are fine-tuned.

VisionClassifier: backbone -> e -> head W_v -> vision logits.
ClipItModel adds P (d_v -> 512), H_t (512 -> 512 -> LeakyReLU(0.1) -> C) and F (2C -> C); the fused
logits are the prediction, P(e) is distilled towards the paired report embedding during training.
At inference no text is needed.

Fine-tuning (`methods.<m>.finetune`) acts on a model's *pretrained* modules: the backbone, and the
head W_v when it is warm-started from another run (CLIP-IT from the unimodal probe):
  frozen  pretrained modules frozen, the rest trained (unimodal = linear probe; "no LoRA" ablation)
  lora    LoRA adapters on every Linear/Conv2d/Embedding of the pretrained modules, base weights frozen
  full    every parameter trained ("full fine-tuning" ablation)
  auto    the method's default (clipit/methods.py: frozen for the linear probes and for what trains
          nothing), else lora if model.lora.enabled, else frozen
New modules (P, H_t, F, a fresh head, baseline classifiers) are always trained in full.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from clipit.config import LoraConfig
from clipit.methods import ModelParts
from clipit.models.losses import symmetric_infonce

LORA_TYPES = {"Linear": nn.Linear, "Conv2d": nn.Conv2d, "Embedding": nn.Embedding}
FINETUNE_MODES = ("frozen", "lora", "full")
# images run through a backbone in this process (feature cache builds and online steps alike): benchmarks
# and tests read it to count backbone forwards
BACKBONE_FORWARDS = {"images": 0}


class BackboneModel(nn.Module):
    """A model that runs a vision backbone. Every model's forward is (images, text_emb) -> dict with
    "logits"; `needs_text` says whether the prediction uses the paired report (the stages ask the method's
    spec instead: clipit/methods.py, text_at_test)."""

    needs_text = False
    warm_start_prefixes: tuple[str, ...] = ("backbone.", "head.")  # what a warm start copies in

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def features(self, images: torch.Tensor) -> torch.Tensor:
        BACKBONE_FORWARDS["images"] += int(images.shape[0])
        if any(p.requires_grad for p in self.backbone.parameters()):
            return self.backbone(images)
        with torch.no_grad():  # frozen backbone (linear probe): no activations kept for backward
            return self.backbone(images)

    def pretrained_modules(self, warm_head: bool) -> tuple[str, ...]:
        """Top-level modules that come pretrained (frozen or LoRA-adapted under frozen/lora)."""
        return ("backbone", "head") if warm_head and hasattr(self, "head") else ("backbone",)


class VisionClassifier(BackboneModel):
    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__(backbone)
        self.head = nn.Linear(backbone.num_features, num_classes)

    def forward(self, images: torch.Tensor, text_emb: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Every model takes (images, text_emb); vision-only models ignore the text."""
        return self.from_features(self.features(images), text_emb)

    def from_features(self, feats: torch.Tensor, text_emb: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Everything after the backbone: forward == from_features(features(images)). A frozen backbone's
        features can then be cached once and only this part trained (training/features.py)."""
        return {"logits": self.head(feats)}


def text_mlp(text_dim: int, num_classes: int) -> nn.Sequential:
    """H_t of CLIP-IT and the reference text model's classifier: 512 -> 512 -> LeakyReLU(0.1) -> C."""
    return nn.Sequential(nn.Linear(text_dim, text_dim), nn.LeakyReLU(0.1), nn.Linear(text_dim, num_classes))


class ClipItModel(VisionClassifier):
    """With `text_tower` set (training with methods.<m>.text_encoder: tower), the distillation target is
    encoded from the paired report's tokens in the same forward pass, inside this one module (one
    DDP/DeepSpeed engine holds both sides); the prediction never uses it."""

    def __init__(self, backbone: nn.Module, num_classes: int, text_dim: int = 512, kd_layers: int = 1):
        super().__init__(backbone, num_classes)
        dim = backbone.num_features
        self.proj = (
            nn.Linear(dim, text_dim)
            if kd_layers == 1
            else nn.Sequential(nn.Linear(dim, dim), nn.LeakyReLU(0.1), nn.Linear(dim, text_dim))
        )
        self.text_head = text_mlp(text_dim, num_classes)
        self.fuse = nn.Linear(2 * num_classes, num_classes)
        self.text_tower: nn.Module | None = None

    def forward(
        self,
        images: torch.Tensor,
        text_emb: torch.Tensor | None = None,
        tokens: torch.Tensor | None = None,
        masked: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        out = self.from_features(self.features(images), text_emb)
        if self.text_tower is not None and tokens is not None:
            out["text_emb"] = self.text_tower(tokens, masked)
        return out

    def from_features(self, feats: torch.Tensor, text_emb: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        vision_logits = self.head(feats)
        proj = self.proj(feats)
        text_logits = self.text_head(proj)
        logits = self.fuse(torch.cat([vision_logits, text_logits], dim=1))
        return {"logits": logits, "vision_logits": vision_logits, "text_logits": text_logits, "proj": proj}

    def pretrained_modules(self, warm_head: bool) -> tuple[str, ...]:
        pretrained = super().pretrained_modules(warm_head)
        return pretrained + ("text_tower",) if self.text_tower is not None else pretrained


def build_vision_classifier(parts: ModelParts) -> VisionClassifier:
    """unimodal (the linear probe) and clip_probe (on a CLIP's vision tower)."""
    return VisionClassifier(parts.backbone, parts.num_classes)


def build_clipit(parts: ModelParts) -> ClipItModel:
    return ClipItModel(parts.backbone, parts.num_classes, text_dim=parts.text_dim, kd_layers=parts.kd_layers)


def clipit_loss(
    outputs: dict, labels: torch.Tensor, text_emb: torch.Tensor | None, lam: float, ce_input: str = "logits"
) -> dict:
    """CE on the fused logits + lam * (1 - cos(P e, t)). t is the text tower's output when the model has
    one, else the cached embedding from the shards. ce_input "softmax" feeds softmax(z) to the CE, i.e.
    -log softmax(softmax(z))_y: the reference code's double softmax (methods.<m>.ce_input). A prompt
    classifier trained with prompt_loss infonce returns `anchor_emb` (its classes' first-template
    embeddings): the loss is then the symmetric InfoNCE of models/losses.py (CE is kept for the logs)."""
    logits = outputs["logits"].float()
    ce = F.cross_entropy(logits.softmax(dim=1) if ce_input == "softmax" else logits, labels)
    if "anchor_emb" in outputs:  # prompt_ft, prompt_loss infonce: images vs their class's first-template prompt
        nce = symmetric_infonce(outputs["image_emb"], outputs["anchor_emb"][labels])
        return {"loss": nce, "ce": ce.detach(), "infonce": nce.detach()}
    text_emb = outputs.get("text_emb", text_emb)
    if "proj" not in outputs or text_emb is None or lam == 0:
        return {"loss": ce, "ce": ce.detach()}
    kd = (1 - F.cosine_similarity(outputs["proj"].float(), text_emb.float(), dim=1)).mean()
    return {"loss": ce + lam * kd, "ce": ce.detach(), "kd": kd.detach()}


# ---------------------------------------------------------------------------------------------
# Fine-tuning


def lora_target_names(model: nn.Module, types: list[str], modules: tuple[str, ...] = ("backbone", "head")) -> list[str]:
    """Every module of the requested types inside `modules` (top-level names).

    Linear layers owned by nn.MultiheadAttention are skipped: its forward reads `out_proj.weight`
    directly, so an adapter there would never run (and would leave unused parameters under DDP).
    """
    classes = tuple(LORA_TYPES[t] for t in types)
    inside_mha = {
        f"{name}.{child}" if name else child
        for name, m in model.named_modules()
        if isinstance(m, nn.MultiheadAttention)
        for child, _ in m.named_children()
    }
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, classes)
        and name not in inside_mha
        and any(name == m or name.startswith(m + ".") for m in modules)
    ]


def apply_lora(model: nn.Module, cfg: LoraConfig, modules: tuple[str, ...] = ("backbone", "head")) -> nn.Module:
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    names = lora_target_names(model, cfg.targets, modules)
    if not names:
        return model
    # a regex that matches exactly these names: peft's list form matches suffixes ("head" would hit backbone.head)
    pattern = "|".join(re.escape(n) for n in names)
    inject_adapter_in_model(
        PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=pattern), model
    )
    return model


def set_trainable(model: nn.Module, finetune: str, pretrained: tuple[str, ...]) -> None:
    """requires_grad per parameter: pretrained modules follow `finetune`, everything else trains."""
    if finetune not in FINETUNE_MODES:
        raise ValueError(f"finetune must be one of {FINETUNE_MODES}, got {finetune!r}")
    for name, param in model.named_parameters():
        if finetune == "full" or name.split(".")[0] not in pretrained:
            param.requires_grad = True
        else:
            param.requires_grad = finetune == "lora" and "lora_" in name


def param_groups(model: nn.Module, lr: float, pretrained_lr: float | None, warm_head: bool) -> list[dict]:
    """The optimizer's parameter groups: trainable pretrained weights (full fine-tuning) at `pretrained_lr`,
    everything fresh (P, H_t, F, LoRA adapters) at `lr`. One group when pretrained_lr is None or equal."""
    pretrained = model.pretrained_modules(warm_head) if hasattr(model, "pretrained_modules") else ()
    base, fresh = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            is_base = name.split(".")[0] in pretrained and "lora_" not in name
            (base if is_base and pretrained_lr not in (None, lr) else fresh).append(param)
    groups = [{"params": fresh, "lr": lr}] if fresh else []
    return groups + ([{"params": base, "lr": pretrained_lr}] if base else [])


def prepare_finetune(model: nn.Module, finetune: str, lora: LoraConfig, warm_head: bool) -> str:
    """Inject LoRA (finetune=lora) into the pretrained modules and set requires_grad; returns the mode."""
    pretrained = model.pretrained_modules(warm_head) if hasattr(model, "pretrained_modules") else ()
    if finetune == "lora" and pretrained:
        apply_lora(model, lora, pretrained)
    set_trainable(model, finetune, pretrained)
    return finetune
