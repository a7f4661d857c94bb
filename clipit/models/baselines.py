"""Baselines and ablations that need the paired report (method.md Stage 3, the "multimodal"
baseline and the early-fusion ablation of v5 Fig. 5).

TextClassifier   (method `text`): report embedding t -> Linear(512,512) -> LeakyReLU(0.1) -> Linear(512,C).
                 The reference "text model" (Stage 3) with the frozen CONCH encoder, on the cached
                 embeddings; its test predictions feed the Omega analysis.
LateFusionModel  (method `late_fusion`): the reference FuserModel_: vision logits W_v e and the text
                 model's logits H_t(t) on the paired report, fused by F = Linear(2C, C). Warm-started
                 from the unimodal probe (backbone + head) and, with `text_warm_start`, from the text
                 model (H_t). With text_encoder: tower the report is encoded by the pairing model's text
                 tower (LoRA under finetune lora) in training and at test time, as the reference's
                 FuserModel_ (its text model carries LoRA); else the cached (frozen) embeddings.
EarlyFusionModel (method `early_fusion`): concat(e, t) -> Linear(d_v+512, 512) -> LeakyReLU(0.1) ->
                 Linear(512, C). The paper does not define its early fusion; this is the plain reading
                 ("concatenate vision and text features before a classifier"), with the same MLP
                 shape as H_t.

All three use the paired report at test time (`needs_text`): their test numbers rely on the test
images' retrieved reports, unlike CLIP-IT, and they cannot be exported as vision-only models.
"""

from __future__ import annotations

import torch
from torch import nn

from clipit.methods import ModelParts
from clipit.models.clipit import BackboneModel, VisionClassifier, text_mlp


def _require_text(text_emb: torch.Tensor | None, who: str) -> torch.Tensor:
    if text_emb is None:
        raise ValueError(f"{who} needs the paired report's embedding (text_emb) at inference")
    return text_emb


class TextClassifier(nn.Module):
    needs_text = True
    warm_start_prefixes = ("text_head.",)

    def __init__(self, text_dim: int, num_classes: int):
        super().__init__()
        self.text_head = text_mlp(text_dim, num_classes)

    def forward(self, images: torch.Tensor | None, text_emb: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return {"logits": self.text_head(_require_text(text_emb, "the text-only classifier").float())}


class LateFusionModel(VisionClassifier):
    needs_text = True

    def __init__(self, backbone: nn.Module, num_classes: int, text_dim: int = 512):
        super().__init__(backbone, num_classes)
        self.text_head = text_mlp(text_dim, num_classes)
        self.fuse = nn.Linear(2 * num_classes, num_classes)
        self.text_tower: nn.Module | None = None  # text_encoder: tower (the reference's LoRA'd text side)

    def forward(
        self,
        images: torch.Tensor,
        text_emb: torch.Tensor | None = None,
        tokens: torch.Tensor | None = None,
        masked: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        if self.text_tower is not None and tokens is not None:  # the report encoded by the (LoRA'd) tower
            text_emb = self.text_tower(tokens, masked)
        return self.from_features(self.features(images), text_emb)

    def pretrained_modules(self, warm_head: bool) -> tuple[str, ...]:
        pretrained = super().pretrained_modules(warm_head)
        return pretrained + ("text_tower",) if self.text_tower is not None else pretrained

    def from_features(self, feats: torch.Tensor, text_emb: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        text_emb = _require_text(text_emb, "late fusion")
        vision_logits = self.head(feats)
        text_logits = self.text_head(text_emb.to(vision_logits.dtype))
        logits = self.fuse(torch.cat([vision_logits, text_logits], dim=1))
        return {"logits": logits, "vision_logits": vision_logits, "text_logits": text_logits}


class EarlyFusionModel(BackboneModel):
    needs_text = True
    warm_start_prefixes = ("backbone.",)

    def __init__(self, backbone: nn.Module, num_classes: int, text_dim: int = 512):
        super().__init__(backbone)
        self.classifier = nn.Sequential(
            nn.Linear(backbone.num_features + text_dim, text_dim), nn.LeakyReLU(0.1), nn.Linear(text_dim, num_classes)
        )

    def forward(self, images: torch.Tensor, text_emb: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return self.from_features(self.features(images), text_emb)

    def from_features(self, feats: torch.Tensor, text_emb: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        text_emb = _require_text(text_emb, "early fusion")
        return {"logits": self.classifier(torch.cat([feats, text_emb.to(feats.dtype)], dim=1))}


def build_text(parts: ModelParts) -> TextClassifier:
    return TextClassifier(parts.text_dim, parts.num_classes)


def build_late_fusion(parts: ModelParts) -> LateFusionModel:
    return LateFusionModel(parts.backbone, parts.num_classes, parts.text_dim)


def build_early_fusion(parts: ModelParts) -> EarlyFusionModel:
    return EarlyFusionModel(parts.backbone, parts.num_classes, parts.text_dim)
