"""Vision-backbone registry: a name gives the architecture, input size, normalisation, output width
and hub ID of a pathology foundation model.

| name | architecture | width | input | normalisation | hub (users with network access) |
|---|---|---|---|---|---|
| uni | timm vit_large_patch16_224, init_values 1e-5 | 1024 | 224 | ImageNet | hf-hub:MahmoodLab/uni |
| kaiko-vits16 / -vits8 | timm vit_small_patch{16,8}_224 | 384 | 224 | 0.5 / 0.5 | torch.hub kaiko-ai/towards_large_pathology_fms |
| kaiko-vitb16 / -vitb8 | timm vit_base_patch{16,8}_224 | 768 | 224 | 0.5 / 0.5 | same |
| kaiko-vitl14 ("DINO") | timm vit_large_patch14_reg4_dinov2 | 1024 | 224 | 0.5 / 0.5 | same |
| conch | CONCH CoCa vision tower (conch-fork), contrastive 512-d output | 512 | 448 | OpenAI CLIP | hf-hub:MahmoodLab/conch |
| timm:<name> | any timm model, its own pretrained config | - | timm's | timm's | timm's pretrained weights |
| clip:<pairing model> | a CLIP's image tower (clip:conch, clip:hf-clip:plip, ...; models/clip_backbone.py) | CLIP's | CLIP's | CLIP's | the CLIP's |
| demo-vit-tiny | a 4-layer ViT for the demo (random init) | 96 | 64 | 0.5 / 0.5 | - |

kaiko models are built as kaiko's own `hubconf.py` and eva's `pathology/kaiko_*` entries build them:
`timm.create_model(arch, dynamic_img_size=True, num_classes=0)`; their native 224 px input at 0.5/0.5
normalisation. Every registered name `X` also has a random-init `X-tiny` variant (same architecture
family and normalisation, 2 layers, width 32-64, small input) for tests.

A `timm:<model>` backbone takes constructor options from `model.timm_kwargs` (e.g. `dynamic_img_size: true`,
`img_size: 224`); its input size is their img_size, else timm's pretrained config (518 px for the DINOv2
ViTs: set model.image_size to run them at 224).

Weights are resolved by `clipit.weights.resolve` (explicit setting -> weights file -> hub) and loaded
strictly by clipit/models/backbone_loading.py: wrappers and prefixes unwrapped, Meta DINOv2 and HF
Dinov2Model ViT checkpoints converted to timm's keys, position grids resampled to the input size, and
then every remaining key must match the model with its shape (docs/models.md).
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from clipit import weights as weights_registry
from clipit.errors import one_line
from clipit.models.backbone_loading import BackboneError, load_state, load_weights, read_checkpoint

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # kaiko.ai models' native normalisation
OPENAI = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))  # CONCH
KAIKO_REPO = "kaiko-ai/towards_large_pathology_fms"
CONCH_PIP = "pip install conch-fork==0.1.0"


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    arch: str  # timm architecture name, or "conch" (the CONCH vision tower)
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    hub_id: str | None = None  # where users with network access get the weights
    kwargs: dict = field(default_factory=dict)  # extra constructor arguments
    dim: int | None = None  # pooled feature width the backbone must produce (checked by `clipit doctor`)
    random_init: bool = False  # no pretrained weights exist (demo, -tiny variants)
    ignore_keys: tuple[str, ...] = ()  # checkpoint key prefixes that belong to unused parts (CONCH caption pooler)
    # "package.module:function" that builds it instead of timm: (spec, weights, weights_file) -> (module, spec),
    # resolved on first use like a method's builder (a CLIP's image tower: models/clip_backbone.py)
    builder: str | None = None


BACKBONES: dict[str, BackboneSpec] = {}


def register(spec: BackboneSpec) -> BackboneSpec:
    BACKBONES[spec.name] = spec
    return spec


register(
    BackboneSpec(
        "demo-vit-tiny",
        "vit_tiny_patch16_224",
        64,
        *HALF,
        dim=96,
        random_init=True,
        kwargs=dict(img_size=64, patch_size=8, embed_dim=96, depth=4, num_heads=3),
    )
)
register(
    BackboneSpec(
        "uni",
        "vit_large_patch16_224",
        224,
        *IMAGENET,
        "hf-hub:MahmoodLab/uni",
        dict(init_values=1e-5, dynamic_img_size=True),
        dim=1024,
    )
)
for _name, _arch, _dim in [
    ("vits16", "vit_small_patch16_224", 384),
    ("vits8", "vit_small_patch8_224", 384),
    ("vitb16", "vit_base_patch16_224", 768),
    ("vitb8", "vit_base_patch8_224", 768),
    ("vitl14", "vit_large_patch14_reg4_dinov2", 1024),
]:
    register(
        BackboneSpec(
            f"kaiko-{_name}",
            _arch,
            224,
            *HALF,
            f"torch.hub:{KAIKO_REPO}:{_name}",
            dict(dynamic_img_size=True),
            dim=_dim,
        )
    )
register(
    BackboneSpec(
        "conch",
        "conch",
        448,
        *OPENAI,
        "hf-hub:MahmoodLab/conch",
        dim=512,
        ignore_keys=("attn_pool_caption.", "ln_caption."),
    )
)

_TINY_VIT = dict(embed_dim=32, depth=2, num_heads=2)


def _tiny(spec: BackboneSpec) -> BackboneSpec:
    """Same architecture family and normalisation, a few layers, random init: for tests."""
    if spec.arch == "conch":
        return replace(
            spec,
            name=spec.name + "-tiny",
            input_size=32,
            hub_id=None,
            random_init=True,
            kwargs=dict(
                vision_cfg=dict(image_size=32, patch_size=16, layers=2, width=64, num_heads=2, n_queries_caption=4),
                embed_dim_caption=64,
            ),
        )
    patch = timm.create_model(spec.arch, pretrained=False, num_classes=0, **_TINY_VIT).patch_embed.patch_size[0]
    size = 4 * patch
    kwargs = {k: v for k, v in spec.kwargs.items() if k == "dynamic_img_size"} | _TINY_VIT | {"img_size": size}
    return replace(
        spec,
        name=spec.name + "-tiny",
        input_size=size,
        hub_id=None,
        random_init=True,
        kwargs=kwargs,
        dim=_TINY_VIT["embed_dim"],
    )


def get_spec(name: str, timm_kwargs: dict | None = None) -> BackboneSpec:
    """The registry entry of `name`; a `timm:<model>` backbone takes `timm_kwargs` (model.timm_kwargs, checked
    at config load) as constructor arguments, and its input size from their img_size, else timm's config."""
    if name in BACKBONES:
        return BACKBONES[name]
    if name.endswith("-tiny") and name[: -len("-tiny")] in BACKBONES:
        return _tiny(BACKBONES[name[: -len("-tiny")]])
    if name.startswith("clip:") and len(name) > len("clip:"):  # a CLIP's image tower (models/clip_backbone.py)
        # input size, normalisation and width: the loaded CLIP's (build_backbone)
        return BackboneSpec(name, "clip", 224, *OPENAI, builder="clipit.models.clip_backbone:build_clip_backbone")
    if name.startswith("timm:"):  # any timm model with its own pretrained config
        arch = name.split(":", 1)[1]
        if not timm.is_model(arch.split(".")[0]):
            raise BackboneError(f"unknown timm model {arch!r} in backbone {name!r}")
        cfg = timm.models.get_pretrained_cfg(arch)
        size = cfg.input_size[-1] if cfg else 224  # e.g. 518 for the DINOv2 ViTs: set model.image_size
        img_size = (timm_kwargs or {}).get("img_size")
        size = img_size[-1] if isinstance(img_size, list | tuple) else img_size or size
        mean, std = (tuple(cfg.mean), tuple(cfg.std)) if cfg else IMAGENET
        return BackboneSpec(name, arch, size, mean, std, hub_id=name, kwargs=dict(timm_kwargs or {}))
    raise BackboneError(
        f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}, <name>-tiny, timm:<model> or clip:<pairing model>"
    )


# ---------------------------------------------------------------------------------------------
# Construction


class ConchVision(nn.Module):
    """CONCH's CoCa vision tower for classification: ViT-B/16 trunk -> attentional pooler (1 query)
    -> LayerNorm -> contrastive projection -> L2 normalisation: the 512-d `encode_image` embedding
    that the reference code's CONCHVisionNet feeds to its linear head. The 256-query captioning
    pooler is not needed for classification and is left out (its checkpoint keys are ignored)."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.trunk = visual.trunk
        self.attn_pool_contrast = visual.attn_pool_contrast
        self.ln_contrast = visual.ln_contrast
        self.proj_contrast = visual.proj_contrast
        self.num_features = self.proj_contrast.shape[1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.trunk.forward_features(images)
        pooled = self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])
        return F.normalize(pooled @ self.proj_contrast, dim=-1)


def _conch_module():
    try:
        from conch.open_clip_custom import coca_model
    except ImportError as err:
        raise BackboneError(f"backbone 'conch' needs the conch-fork package ({err}); {CONCH_PIP}") from None
    return coca_model


def _create_conch(spec: BackboneSpec) -> nn.Module:
    coca_model = _conch_module()
    cfg = json.loads((Path(coca_model.__file__).parent / "model_configs" / "conch_ViT-B-16.json").read_text())
    vision_cfg = cfg["vision_cfg"] | spec.kwargs.get("vision_cfg", {})
    visual = coca_model._build_vision_tower(
        cfg["embed_dim"], vision_cfg, spec.kwargs.get("embed_dim_caption", cfg["embed_dim_caption"])
    )
    return ConchVision(visual)


def _timm_kwargs(spec: BackboneSpec, image_size: int | None) -> dict:
    kwargs = dict(spec.kwargs)
    if image_size and image_size != spec.input_size and not kwargs.get("dynamic_img_size"):
        kwargs["img_size"] = image_size  # fixed-size models need their position grid rebuilt
    return kwargs


def timm_create_args(spec: BackboneSpec, image_size: int | None = None) -> dict | None:
    """The keyword arguments of `timm.create_model(spec.arch, pretrained=False, **args)` that build this
    backbone headless (an export's config.json records them); None for a backbone timm does not build."""
    if spec.arch in ("conch", "clip"):
        return None
    return {"num_classes": 0, **_timm_kwargs(spec, image_size)}


def create_backbone(spec: BackboneSpec, image_size: int | None = None) -> nn.Module:
    """The architecture with random weights; forward returns pooled features [B, num_features]."""
    if spec.arch == "clip":
        raise BackboneError(
            f"backbone {spec.name!r} is a CLIP's image tower: it is built with its CLIP (build_backbone)"
        )
    if spec.arch == "conch":
        return _create_conch(spec)
    try:
        return timm.create_model(spec.arch, pretrained=False, num_classes=0, **_timm_kwargs(spec, image_size))
    except (RuntimeError, TypeError, ValueError) as err:
        options = f" with model.timm_kwargs {spec.kwargs}" if spec.name.startswith("timm:") and spec.kwargs else ""
        fix = "; fix or remove the option in model.timm_kwargs" if options else ""
        raise BackboneError(
            f"cannot build backbone {spec.name!r} ({spec.arch}){options}: {one_line(err)}{fix}"
        ) from None


def resolve_weights(name: str, weights: str | Path | None = None, weights_file: str | Path | None = None):
    """Where backbone `name` gets its weights (a `clipit.weights.WeightsSource`)."""
    spec = get_spec(name)
    if spec.arch == "clip":
        return clip_weights(name, weights, weights_file)
    return weights_registry.resolve(name, weights, weights_file, spec.hub_id, spec.random_init)


def build_backbone(
    name: str,
    weights=None,
    image_size: int | None = None,
    weights_file: str | Path | None = None,
    timm_kwargs: dict | None = None,
) -> tuple[nn.Module, BackboneSpec]:
    """A headless backbone with its weights loaded. `weights` is a path, a hub ID, `random`, a
    resolved `WeightsSource`, or None (weights file, then hub, then random for demo/tiny models).
    `timm_kwargs` are a timm: backbone's constructor options (model.timm_kwargs)."""
    spec = get_spec(name, timm_kwargs)
    if spec.builder is not None:
        module, _, function = spec.builder.partition(":")
        return getattr(importlib.import_module(module), function)(spec, weights, weights_file)
    try:
        source = (
            weights
            if isinstance(weights, weights_registry.WeightsSource)
            else resolve_weights(name, weights, weights_file)
        )
    except weights_registry.WeightsError as err:
        raise BackboneError(str(err)) from None
    model = create_backbone(spec, image_size)
    if source.kind == "file":
        load_weights(model, source.location, spec)
    elif source.kind == "hub":
        try:
            state = fetch_hub_state(spec, source.location, image_size)
        except BackboneError:
            raise
        except Exception as err:  # network, gated repo, missing token, missing cache
            raise BackboneError(str(weights_registry.hub_failure(name, source.location, err, weights_file))) from None
        load_state(model, state, spec, source.location)
    return model, spec


def fetch_hub_state(spec: BackboneSpec, hub_id: str, image_size: int | None = None) -> dict:
    """Download (or read from the local hub cache) the backbone's state dict. timm resamples the
    position grid of fixed-size models to `image_size` as it loads."""
    if hub_id.startswith("torch.hub:"):  # torch.hub:<owner>/<repo>:<entry>, as eva's kaiko entries
        repo, entry = hub_id[len("torch.hub:") :].rsplit(":", 1)
        if not weights_registry.trust_hub():  # torch.hub runs the repository's hubconf.py on this machine
            raise BackboneError(str(weights_registry.untrusted_hub(spec.name, hub_id)))
        return torch.hub.load(repo, entry, trust_repo=True).state_dict()
    if spec.arch == "conch":
        from huggingface_hub import hf_hub_download

        repo = hub_id.split(":", 1)[1]
        return read_checkpoint(Path(hf_hub_download(repo, filename="pytorch_model.bin")))
    kwargs = _timm_kwargs(spec, image_size)
    if hub_id.startswith("timm:"):
        return timm.create_model(hub_id.split(":", 1)[1], pretrained=True, num_classes=0, **kwargs).state_dict()
    hub_id = "hf-hub:" + hub_id.split(":", 1)[1]  # accept hf_hub: as CONCH spells it
    return timm.create_model(hub_id, pretrained=True, num_classes=0, **kwargs).state_dict()


def clip_weights(name: str, weights=None, weights_file: str | Path | None = None) -> weights_registry.WeightsSource:
    """Where the CLIP of backbone clip:<pairing model> comes from: model.weights, else the weights file's
    entry for the pairing-model name (`conch:`), else its own (open_clip:hf-hub:<repo>); the pairing
    loader checks it (it takes folders too)."""
    if isinstance(weights, weights_registry.WeightsSource):
        return weights
    pairing = name.split(":", 1)[1]
    origin = "model.weights" if weights else f"weights file entry {pairing!r}"
    checkpoint = weights_registry.resolve_pairing_checkpoint(pairing, weights, weights_file)
    if checkpoint is None:
        return weights_registry.WeightsSource("hub", None, f"{pairing} itself")
    return weights_registry.WeightsSource("file", str(checkpoint), origin)
