"""The CLIP-based baselines (method.md section 4, Fig. 1c / Fig. 3): a pairing-capable CLIP of the registry
(clipit/pairing/encoders.py: CONCH, open_clip incl. hf-hub:wisdomik/QuiltNet-B-32 and PathCLIP, hf-clip:<name>
for transformers CLIPs such as PLIP, the demo CLIP) as a classifier. Which CLIP: section `clip` (default: pairing.model); class names: pairing.class_names (default
per dataset, clipit/pairing/texts.py); templates: clip.templates (default CONCH's 22).

zero_shot   prompt ensemble: per class the mean of its prompts' L2-normalised text embeddings,
            renormalised (clip.ensemble embeddings) or not (logits: then s * cos is the mean of the
            per-template logits, the reference's test); logits = s * normalise(image_emb) @ class_emb.T. Nothing trains: the "train"
            stage encodes the prompts once and saves the class embeddings as the run's checkpoint.
prompt_ft   LoRA on both towers; every step encodes all C x T prompts through the LoRA'd text tower and
            trains CE over the image-to-class-ensemble logits (prompt_loss ce), or encodes the C
            first-template prompts and trains the reference's symmetric InfoNCE, tau 0.07, against them
            (prompt_loss infonce; models/losses.py). Each validation caches the class
            embeddings it used in the checkpoint, so test time runs the vision tower only.
clip_probe  the CLIP's vision tower + a linear head: a VisionClassifier (backbone / head / from_features),
            so a frozen, unaugmented probe trains on the feature cache (clipit/training/features.py).
Their specs are in clipit/methods.py; clipit/models/factory.py builds them from `load_clip`'s ClipSource.

s is the CLIP's own exp(logit_scale) unless clip.logit_scale sets it (1/0.07 = 14.29 is the reference's
tau = 0.07); clip.learn_logit_scale trains it under prompt_ft. The towers' weights always come from the
CLIP checkpoint, so checkpoints hold only what training changed plus the cached class embeddings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from clipit.config import ConfigError, ExperimentConfig
from clipit.methods import ModelParts
from clipit.models.backbones import OPENAI, ConchVision
from clipit.models.clipit import BackboneModel
from clipit.models.preprocess import DevicePreprocess
from clipit.pairing import hf_clip
from clipit.pairing.encoders import ConchPairingModel, PairingModel, PairingModelError, build_pairing_model
from clipit.pairing.hf_clip import HFClipVisual
from clipit.pairing.texts import CONCH_TEMPLATES, class_names_for
from clipit.weights import resolve_pairing_checkpoint

MAX_LOGIT_SCALE = 100.0  # CLIP's clamp


def prompt_ensemble(prompt_emb: torch.Tensor, templates: int, ensemble: str = "embeddings") -> torch.Tensor:
    """[C*T, D] prompt embeddings (class-major) -> [C, D]: per class the mean of the L2-normalised
    embeddings of its T prompts, renormalised (ensemble "embeddings"), or not (ensemble "logits"): cosine
    is linear in the normalised text side, so s * cos(x, mean) is then the mean of the T per-template
    logits s * cos(x, t), the reference code's prompt ensemble."""
    emb = F.normalize(prompt_emb.float(), dim=-1)
    mean = emb.view(-1, templates, emb.shape[-1]).mean(1)
    return F.normalize(mean, dim=-1) if ensemble == "embeddings" else mean


def similarity_logits(image_emb: torch.Tensor, class_emb: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """scale * normalise(image) @ class.T: [B, D] x [C, D] -> [B, C] (cos(image, class) for unit class rows)."""
    return scale * F.normalize(image_emb.float(), dim=-1) @ class_emb.float().T


class ClipVision(nn.Module):
    """An open_clip CLIP's image tower as a backbone: images -> L2-normalised joint-space embeddings."""

    def __init__(self, visual: nn.Module, dim: int):
        super().__init__()
        self.visual = visual
        self.num_features = dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.visual(images)
        return F.normalize((out[0] if isinstance(out, tuple) else out).float(), dim=-1)  # CoCa: (latent, tokens)


class PromptClassifier(BackboneModel):
    """zero_shot / prompt_ft: cosine similarity to cached class embeddings (`class_emb`, saved with the
    checkpoint). With a `text_tower` (prompt_ft training) the class embeddings are encoded from the prompt
    tokens in every training forward, and once per evaluation pass (then cached in `class_emb`)."""

    warm_start_prefixes = ()
    always_saved = ("class_emb", "log_scale")  # cached prompts and the scale, also when they do not train

    def __init__(
        self, backbone: nn.Module, num_classes: int, logit_scale: float = MAX_LOGIT_SCALE, learn_scale: bool = False
    ):
        super().__init__(backbone)
        self.register_buffer("class_emb", torch.zeros(num_classes, backbone.num_features))
        log_scale = torch.tensor(math.log(logit_scale))
        if learn_scale:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)
        self.text_tower: nn.Module | None = None
        self.templates = 1
        self.ensemble = "embeddings"  # clip.ensemble: how the training forward combines the templates
        self.prompt_loss = "ce"  # infonce: the forward also returns the first-template class embeddings
        self.text_parameters = 0  # of the text tower that (once) encodes the prompts: the cost record
        self._cached = False

    def attach_prompts(
        self, tower: nn.Module, prompts: list[str], templates: int, ensemble: str = "embeddings", loss: str = "ce"
    ) -> None:
        self.text_tower, self.templates, self.ensemble, self.prompt_loss = tower, templates, ensemble, loss
        self.register_buffer("prompt_tokens", tower.tokenize(prompts), persistent=False)
        self.anchor_emb: torch.Tensor | None = None  # first-template class embeddings of the last encoding

    def train(self, mode: bool = True):
        self._cached = False  # the tower may change: the next evaluation pass encodes the prompts again
        return super().train(mode)

    def class_embeddings(self) -> torch.Tensor:
        if self.text_tower is None or (self._cached and not self.training):
            return self.class_emb
        if self.training and self.prompt_loss == "infonce":  # the reference encodes the first template only
            tokens = self.prompt_tokens.view(-1, self.templates, self.prompt_tokens.shape[-1])[:, 0]
            anchors = F.normalize(self.text_tower(tokens).float(), dim=-1)
            self.anchor_emb = anchors
            return anchors
        prompt_emb = self.text_tower(self.prompt_tokens)
        cls = prompt_ensemble(prompt_emb, self.templates, self.ensemble)
        with torch.no_grad():
            self.class_emb.copy_(cls.detach())
            anchors = F.normalize(prompt_emb.float(), dim=-1).view(-1, self.templates, cls.shape[-1])[:, 0]
            self.anchor_emb = anchors.detach()
        self._cached = not self.training
        return cls

    def forward(self, images: torch.Tensor, text_emb: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return self.from_features(self.features(images), text_emb)

    def from_features(self, feats: torch.Tensor, text_emb: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        scale = self.log_scale.exp().clamp(max=MAX_LOGIT_SCALE)
        out = {"logits": similarity_logits(feats, self.class_embeddings(), scale)}
        if self.text_tower is not None and self.prompt_loss == "infonce":
            out |= {"image_emb": feats, "anchor_emb": self.anchor_emb}
        return out

    def pretrained_modules(self, warm_head: bool) -> tuple[str, ...]:
        return ("backbone", "text_tower") if self.text_tower is not None else ("backbone",)

    def inference_cost(self, counts: dict) -> dict:
        """Test time runs the vision tower only; the text tower ran once to cache the C x D class embeddings."""
        cached = int(self.class_emb.numel())
        return {
            "inference": counts["inference"] + cached,
            "cached_class_embeddings": cached,
            "text_tower_once": int(self.text_parameters),  # every value here is a parameter count (results/runs.py)
        }


# ---------------------------------------------------------------------------------------------
# Building from a config


def clip_source(cfg: ExperimentConfig) -> tuple[str, str | None]:
    """(registry name, checkpoint) of the baselines' CLIP: section clip, else the pairing model's."""
    name = cfg.clip.model or cfg.pairing.model
    checkpoint = cfg.clip.checkpoint or (cfg.pairing.checkpoint if name == cfg.pairing.model else None)
    return name, resolve_pairing_checkpoint(name, checkpoint, cfg.model.weights_file)


def class_prompts(cfg: ExperimentConfig, classes: list[str]) -> tuple[list[str], int]:
    """(C x T prompts, class-major; T): the templates filled with one name per class."""
    names = cfg.pairing.class_names
    if names is not None and len(names) != len(classes):
        raise ConfigError(
            f"pairing.class_names has {len(names)} names but the shards in {cfg.shards.dir} hold "
            f"{len(classes)} classes {list(classes)}; give one prompt name per class, in that order"
        )
    templates = list(cfg.clip.templates or CONCH_TEMPLATES)
    names = class_names_for(cfg.data.name, classes, names)
    return [t.replace("CLASSNAME", n) for n in names for t in templates], len(templates)


def vision_tower(pairing: PairingModel) -> nn.Module:
    clip = pairing.model
    if isinstance(pairing, ConchPairingModel):
        return ConchVision(clip.visual)
    visual = getattr(clip, "visual", None)
    if not isinstance(visual, nn.Module) or not hasattr(visual, "output_dim"):
        raise PairingModelError(
            f"{pairing.name}: {type(clip).__name__} has no open_clip image tower (`visual`); "
            "the CLIP baselines take conch, open_clip:<arch>, hf-clip:<name> or demo-clip"
        )
    return ClipVision(visual, int(visual.output_dim))


def input_spec(pairing: PairingModel, vision: nn.Module) -> tuple[int, tuple, tuple]:
    """(side, mean, std) the CLIP's image tower expects."""
    if isinstance(vision, ConchVision):
        return int(vision.trunk.patch_embed.img_size[0]), *OPENAI
    size = vision.visual.image_size
    mean = tuple(getattr(vision.visual, "image_mean", None) or OPENAI[0])
    std = tuple(getattr(vision.visual, "image_std", None) or OPENAI[1])
    return int(size[0] if isinstance(size, (tuple, list)) else size), mean, std


def architecture(pairing: PairingModel, vision: nn.Module) -> dict | None:
    """What rebuilds the vision tower without weights (an export's config.json); None if unknown."""
    try:
        if isinstance(vision.visual if isinstance(vision, ClipVision) else None, HFClipVisual):
            return hf_clip.vision_architecture(vision.visual)
        if isinstance(vision, ConchVision):
            from clipit.pairing.encoders import conch_config

            cfg = pairing.identity.get("config") or conch_config()
            return {
                "family": "conch",
                "embed_dim": cfg["embed_dim"],
                "embed_dim_caption": cfg["embed_dim_caption"],
                "vision_cfg": cfg["vision_cfg"],
            }
        import open_clip
        from open_clip.transformer import QuickGELU

        from clipit.pairing.demo_clip import register_demo_clip

        arch = register_demo_clip() if pairing.name == "demo-clip" else pairing.name.split(":", 1)[1]
        cfg = open_clip.get_model_config(arch)
        quick = any(isinstance(m, QuickGELU) for m in vision.modules())
        return {
            "family": "open_clip",
            "embed_dim": cfg["embed_dim"],
            "vision_cfg": cfg["vision_cfg"],
            "quick_gelu": quick,
        }
    except Exception:  # an architecture open_clip cannot describe offline: training works, export says why not
        return None


def vision_from_architecture(arch: dict) -> nn.Module:
    """The vision tower of `architecture()`, random weights (an export's model.safetensors fills them)."""
    if arch["family"] == "conch":
        from conch.open_clip_custom import coca_model

        return ConchVision(
            coca_model._build_vision_tower(arch["embed_dim"], arch["vision_cfg"], arch["embed_dim_caption"])
        )
    if arch["family"] == "hf-clip":
        return ClipVision(hf_clip.vision_from_architecture(arch), int(arch["projection_dim"]))
    from open_clip.model import _build_vision_tower

    return ClipVision(
        _build_vision_tower(arch["embed_dim"], dict(arch["vision_cfg"]), arch["quick_gelu"]), int(arch["embed_dim"])
    )


def text_parameters(clip: nn.Module) -> int:
    """Parameters that `encode_text` runs (what TextTower keeps)."""
    from clipit.pairing.text_tower import UNUSED_BY_TEXT

    return sum(p.numel() for n, p in clip.named_parameters() if n.split(".")[0] not in UNUSED_BY_TEXT)


@dataclass
class ClipSource:
    """The `clip` section's CLIP, loaded once for a CLIP method's model (the builders' `parts.clip`)."""

    cfg: ExperimentConfig
    name: str
    checkpoint: str | None
    pairing: PairingModel
    vision: nn.Module  # its image tower, the model's backbone
    preprocess: DevicePreprocess
    encode_prompts: bool  # training: the class prompts are encoded (zero_shot once, prompt_ft every step)
    prompt_loss: str = "ce"  # the trained method's methods.<m>.prompt_loss

    def prompts(self) -> tuple[list[str], int]:
        from clipit.shards.manifest import load_manifest

        return class_prompts(self.cfg, load_manifest(self.cfg.shards.dir)["classes"])

    def logit_scale(self) -> float:
        own = getattr(self.pairing.model, "logit_scale", None)
        scale = self.cfg.clip.logit_scale or (
            float(own.detach().exp()) if isinstance(own, torch.Tensor) else MAX_LOGIT_SCALE
        )
        return min(scale, MAX_LOGIT_SCALE)

    def describe(self, model: nn.Module) -> None:
        """What an export records of the CLIP (export_fields)."""
        model.clip_architecture = architecture(self.pairing, self.vision)
        model.clip_identity = {
            "model": self.name,
            "checkpoint": None if self.checkpoint is None else str(self.checkpoint),
        }


def load_clip(cfg: ExperimentConfig, text_tower: bool = True, prompt_loss: str = "ce") -> ClipSource:
    """The CLIP of a CLIP method. `text_tower` (training) encodes the class prompts; without it (evaluation,
    export) the checkpoint's cached class embeddings are loaded after the model is built."""
    name, checkpoint = clip_source(cfg)
    pairing = build_pairing_model(name, checkpoint, device="cpu")
    vision = vision_tower(pairing)
    vision.weights_from_clip = True  # checkpoints never hold its base weights (clipit/models/checkpoint.py)
    size, mean, std = input_spec(pairing, vision)
    return ClipSource(
        cfg, name, checkpoint, pairing, vision, DevicePreprocess(size, mean, std), text_tower, prompt_loss
    )


def _prompt_classifier(parts: ModelParts, learn_scale: bool) -> PromptClassifier:
    clip: ClipSource | None = parts.clip
    if clip is None:  # an export's bare architecture: the checkpoint fills class_emb and log_scale
        return PromptClassifier(parts.backbone, parts.num_classes)
    model = PromptClassifier(parts.backbone, parts.num_classes, clip.logit_scale(), learn_scale=learn_scale)
    model.text_parameters = text_parameters(clip.pairing.model)
    return model


def build_zero_shot(parts: ModelParts) -> PromptClassifier:
    """The prompt ensemble, encoded once: nothing trains."""
    model = _prompt_classifier(parts, learn_scale=False)
    if parts.clip is not None and parts.clip.encode_prompts:
        prompts, templates = parts.clip.prompts()
        emb = parts.clip.pairing.encode_texts(prompts).cpu()
        model.class_emb.copy_(prompt_ensemble(emb, templates, parts.clip.cfg.clip.ensemble))
    return model


def build_prompt_ft(parts: ModelParts) -> PromptClassifier:
    """The prompt ensemble through the (LoRA'd) text tower in every training step."""
    clip: ClipSource | None = parts.clip
    model = _prompt_classifier(parts, learn_scale=clip is not None and clip.cfg.clip.learn_logit_scale)
    if clip is not None and clip.encode_prompts:
        from clipit.pairing.text_tower import text_tower_from

        prompts, templates = clip.prompts()
        tower = text_tower_from(clip.pairing, copy=False)
        model.attach_prompts(tower, prompts, templates, clip.cfg.clip.ensemble, clip.prompt_loss)
    return model


def export_fields(model: nn.Module, where: Path | str) -> dict:
    """What an export's config.json adds for a CLIP baseline (rebuilt by `vision_from_architecture`)."""
    owner = model if hasattr(model, "clip_architecture") else model.backbone  # a CLIP method, or clip:<name>
    arch = getattr(owner, "clip_architecture", None)
    if arch is None:
        raise PairingModelError(
            f"{where}: the architecture of its CLIP ({getattr(owner, 'clip_identity', {})}) cannot "
            "be described offline, so the export could not be rebuilt; export needs conch, "
            "demo-clip or an open_clip architecture"
        )
    fields = {"clip_architecture": arch, "clip": owner.clip_identity}
    if isinstance(model, PromptClassifier):  # test time: vision tower + cached class embeddings
        fields["inference_cost"] = model.inference_cost({"inference": sum(p.numel() for p in model.parameters())})
    return fields
