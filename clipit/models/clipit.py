"""The CLIP-IT classifier (method.md Stage 4) and its unimodal warm start (Stage 0).

VisionClassifier: backbone -> e -> head W_v -> vision logits.
ClipItModel adds P (d_v -> 512), H_t (512 -> 512 -> LeakyReLU(0.1) -> C) and F (2C -> C); the fused
logits are the prediction, P(e) is distilled towards the paired report embedding during training.
At inference no text is needed.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from clipit.config import LoraConfig

LORA_TYPES = {"Linear": nn.Linear, "Conv2d": nn.Conv2d, "Embedding": nn.Embedding}


class VisionClassifier(nn.Module):
    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.num_features, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        if any(p.requires_grad for p in self.backbone.parameters()):
            return self.backbone(images)
        with torch.no_grad():  # frozen backbone (linear probe): no activations kept for backward
            return self.backbone(images)

    def forward(self, images: torch.Tensor, text_emb: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Every model takes (images, text_emb); vision-only models ignore the text."""
        return {"logits": self.head(self.features(images))}


class ClipItModel(VisionClassifier):
    def __init__(self, backbone: nn.Module, num_classes: int, text_dim: int = 512, kd_layers: int = 1):
        super().__init__(backbone, num_classes)
        dim = backbone.num_features
        self.proj = (nn.Linear(dim, text_dim) if kd_layers == 1 else
                     nn.Sequential(nn.Linear(dim, dim), nn.LeakyReLU(0.1), nn.Linear(dim, text_dim)))
        self.text_head = nn.Sequential(nn.Linear(text_dim, text_dim), nn.LeakyReLU(0.1), nn.Linear(text_dim, num_classes))
        self.fuse = nn.Linear(2 * num_classes, num_classes)

    def forward(self, images: torch.Tensor, text_emb: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        feats = self.features(images)
        vision_logits = self.head(feats)
        proj = self.proj(feats)
        text_logits = self.text_head(proj)
        logits = self.fuse(torch.cat([vision_logits, text_logits], dim=1))
        return {"logits": logits, "vision_logits": vision_logits, "text_logits": text_logits, "proj": proj}


NEW_HEADS = ("proj", "text_head", "fuse")


def clipit_loss(outputs: dict, labels: torch.Tensor, text_emb: torch.Tensor | None, lam: float) -> dict:
    """CE on the fused logits (plain CE, not the reference code's double softmax) + lam * (1 - cos(P e, t))."""
    ce = F.cross_entropy(outputs["logits"].float(), labels)
    if "proj" not in outputs or text_emb is None or lam == 0:
        return {"loss": ce, "ce": ce.detach()}
    kd = (1 - F.cosine_similarity(outputs["proj"].float(), text_emb.float(), dim=1)).mean()
    return {"loss": ce + lam * kd, "ce": ce.detach(), "kd": kd.detach()}


def lora_target_names(model: VisionClassifier, types: list[str]) -> list[str]:
    """Every module of the requested types in the backbone and the warm-started head."""
    classes = tuple(LORA_TYPES[t] for t in types)
    return [name for name, module in model.named_modules()
            if isinstance(module, classes) and (name.startswith("backbone.") or name == "head")]


def apply_lora(model: VisionClassifier, cfg: LoraConfig) -> VisionClassifier:
    from peft import LoraConfig as PeftLoraConfig, inject_adapter_in_model

    names = lora_target_names(model, cfg.targets)
    # a regex that matches exactly these names: peft's list form matches suffixes ("head" would hit backbone.head)
    pattern = "|".join(re.escape(n) for n in names)
    inject_adapter_in_model(PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                           target_modules=pattern), model)
    return model


def set_trainable(model: VisionClassifier, method: str, lora: bool) -> None:
    """unimodal: head only (linear probe). clipit: LoRA adapters (or the whole backbone if no LoRA
    and the config says full fine-tuning) plus the new heads P, H_t, F."""
    for name, param in model.named_parameters():
        if method == "unimodal":
            param.requires_grad = name.startswith("head.")
        elif lora:
            param.requires_grad = "lora_" in name or name.split(".")[0] in NEW_HEADS
        else:  # frozen backbone and head, trainable new heads (the paper's "no LoRA" ablation)
            param.requires_grad = name.split(".")[0] in NEW_HEADS


def build_classifier(method: str, backbone: nn.Module, num_classes: int, text_dim: int, kd_layers: int) -> VisionClassifier:
    if method == "unimodal":
        return VisionClassifier(backbone, num_classes)
    return ClipItModel(backbone, num_classes, text_dim=text_dim, kd_layers=kd_layers)
