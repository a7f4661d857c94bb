"""Vision-backbone registry: a name gives the timm architecture, input size, normalisation and hub ID.

Weights come from a local checkpoint (strict load; a mismatch is one clear error) or, on machines
with network access, from the hub ID. Random init is only for the demo and tests.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # kaiko.ai models' native normalisation


class BackboneError(ValueError):
    """A backbone name or its weights are wrong (one line, names the file or key to fix)."""


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    timm_name: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    hub_id: str | None = None  # where users with network access get the weights
    kwargs: dict = field(default_factory=dict)  # extra timm.create_model arguments


BACKBONES: dict[str, BackboneSpec] = {}


def register(spec: BackboneSpec) -> BackboneSpec:
    BACKBONES[spec.name] = spec
    return spec


register(BackboneSpec("demo-vit-tiny", "vit_tiny_patch16_224", 64, *HALF,
                      kwargs=dict(img_size=64, patch_size=8, embed_dim=96, depth=4, num_heads=3)))
register(BackboneSpec("uni", "vit_large_patch16_224", 224, *IMAGENET, "hf-hub:MahmoodLab/uni",
                      dict(init_values=1e-5, dynamic_img_size=True)))
for _name, _timm in [("vits16", "vit_small_patch16_224"), ("vits8", "vit_small_patch8_224"),
                     ("vitb16", "vit_base_patch16_224"), ("vitb8", "vit_base_patch8_224"),
                     ("vitl14", "vit_large_patch14_224")]:
    register(BackboneSpec(f"kaiko-{_name}", _timm, 224, *HALF, f"torch.hub:kaiko-ai/towards_large_pathology_fms:{_name}",
                          dict(dynamic_img_size=True)))


def get_spec(name: str) -> BackboneSpec:
    if name in BACKBONES:
        return BACKBONES[name]
    if name.startswith("timm:"):  # any timm model, ImageNet normalisation
        return BackboneSpec(name, name.split(":", 1)[1], 224, *IMAGENET)
    raise BackboneError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)} or timm:<model>")


def build_backbone(name: str, weights: str | Path | None = None, image_size: int | None = None) -> tuple[torch.nn.Module, BackboneSpec]:
    """A headless backbone whose forward returns pooled features [B, num_features]."""
    spec = get_spec(name)
    kwargs = dict(spec.kwargs)
    if image_size and image_size != spec.input_size:
        kwargs["img_size"] = image_size
    model = timm.create_model(spec.timm_name, pretrained=False, num_classes=0, **kwargs)
    if weights is not None:
        load_weights(model, weights, name)
    return model, spec


def load_weights(model: torch.nn.Module, weights: str | Path, name: str) -> None:
    path = Path(weights)
    if not path.is_file():
        raise BackboneError(f"{path}: weights for backbone {name!r} not found; fix model.weights or the weights file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc."))}  # classifier heads differ
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:  # missing/unexpected keys or shape mismatches
        detail = " ".join(str(err).split())[:300]
        raise BackboneError(f"{path}: does not fit backbone {name!r} ({detail}); point model.weights at this backbone's checkpoint") from None
