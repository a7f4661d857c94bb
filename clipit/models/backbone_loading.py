"""Reading a backbone checkpoint and loading it strictly, whatever its layout.

A checkpoint is read as tensors only (safetensors, or torch.load(weights_only=True)), unwrapped
(`state_dict`, `model`, `teacher`, `module` nesting), stripped of the wrapper prefix that fits the
model best (`module.`, `backbone.`, `_model.`, `model.`, `teacher.`, `visual.`, ...), converted to timm's
keys when it is a ViT in Meta DINOv2 or HF Dinov2Model layout (clipit/models/vit_layouts.py), its
position grid resampled to the model's input size, and then every remaining key must match the
model with its shape: no silent partial loads.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from clipit.errors import ClipitError, one_line
from clipit.models import vit_layouts
from clipit.state_dict import load_strict, mismatch

# wrapper prefixes a checkpoint may put in front of the backbone's own keys
WRAPPER_PREFIXES = (
    "module.",
    "_orig_mod.",
    "teacher.",
    "backbone.",
    "_model.",
    "model.",
    "encoder.",
    "visual.",
    "trunk.",
)
HEAD_PREFIXES = ("head.", "fc.", "classifier.")
HINT = "point model.weights or the weights file at this backbone's checkpoint"


class BackboneError(ClipitError):
    """A backbone name or its weights are wrong (one line, names the file or key to fix)."""


def read_checkpoint(path: Path) -> dict:
    """Tensors of a weights file. Nothing in it is executed: safetensors holds tensors only, and .pt/.pth/
    .bin files are read with torch.load(weights_only=True), which refuses any object but tensors and
    plain containers."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise BackboneError(
                f"{path}: not a readable safetensors file ({one_line(err)}); point model.weights "
                "or the weights file at an intact checkpoint"
            ) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # objects beyond tensors (some Lightning checkpoints), or not a checkpoint at all
        raise BackboneError(
            f"{path}: cannot be read as tensors only ({type(err).__name__}); clipit never loads "
            "the Python objects a checkpoint may carry (they can run code). Convert it where you "
            "trust it: save its tensors alone with safetensors.torch.save_file(state_dict, "
            "'weights.safetensors') and point model.weights there"
        ) from None


def unwrap_state(obj) -> dict[str, torch.Tensor]:
    """The tensor dict inside a checkpoint: Lightning/eva `state_dict`, `model`, DINO `teacher`."""
    for _ in range(4):
        if not isinstance(obj, dict):
            break
        inner = next(
            (obj[k] for k in ("state_dict", "model", "teacher", "module") if isinstance(obj.get(k), dict)), None
        )
        if inner is None or any(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        obj = inner
    if not isinstance(obj, dict):
        raise BackboneError(f"checkpoint holds a {type(obj).__name__}, not a state dict")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _prefixes(state) -> set[str]:
    """Every run of wrapper segments a key starts with (`backbone._model.`, `teacher.backbone.`, ...)."""
    segments = {p.rstrip(".") for p in WRAPPER_PREFIXES}
    found = {""}
    for key in state:
        parts = key.split(".")
        for i in range(1, len(parts)):
            if parts[i - 1] not in segments:
                break
            found.add(".".join(parts[:i]) + ".")
    return found


def _best_prefix(state, own: set[str], vit: bool) -> tuple[str, str | None]:
    """The wrapper prefix under which the most keys fit the model once renamed to timm's keys (the rest
    belong to the wrapper: heads, a CLIP's text tower, DINO's student), and the layout found under it."""
    best = ("", None, -1)
    for prefix in sorted(_prefixes(state)):
        keys = [k[len(prefix) :] for k in state if k.startswith(prefix)]
        layout = vit_layouts.detect(keys) if vit else None
        hits = sum(vit_layouts.timm_name(k, layout) in own for k in keys)
        if hits > best[2]:
            best = (prefix, layout, hits)
    return best[0], best[1]


def match_keys(state: dict[str, torch.Tensor], model: nn.Module, spec=None, where="checkpoint") -> dict:
    """The checkpoint's backbone tensors under the model's own (timm) keys, position grid resampled.
    A ViT checkpoint whose register tokens or grid cannot fit the model is one BackboneError."""
    own = set(model.state_dict())
    vit = vit_layouts.is_vit(model)
    prefix, layout = _best_prefix(state, own, vit)
    state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if vit:
        state = vit_layouts.to_timm(state, layout)
        name, arch = (spec.name, spec.arch) if spec else ("?", type(model).__name__)
        problem = vit_layouts.register_mismatch(state, model, layout, name, arch)
        if not problem and (why := vit_layouts.fit_pos_embed(state, model)):
            problem = f"{why}; backbone {name!r} ({arch}) cannot use it"
        if problem:
            raise BackboneError(f"{where}: {problem}")
    ignore = tuple(spec.ignore_keys) if spec else ()
    return {
        k: v
        for k, v in state.items()
        if k in own or not (k.startswith(HEAD_PREFIXES) or (ignore and k.startswith(ignore)))
    }


def _reads_as(state: dict, model: nn.Module) -> str:
    """What the checkpoint looks like, for the error when it does not fit."""
    if not vit_layouts.is_vit(model):
        return ""
    prefix, layout = _best_prefix(state, set(model.state_dict()), True)
    if layout is None:
        return "the checkpoint is in no layout clipit converts (timm, Meta DINOv2, HF Dinov2Model ViTs, docs/models.md)"
    inner = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    shape = vit_layouts.describe(vit_layouts.to_timm(inner, layout))
    expected = vit_layouts.describe(model.state_dict())
    return f"it reads as a ViT in {layout} layout ({shape}), the backbone is one of {expected}"


def load_state(model: nn.Module, state: dict, spec, where: str | Path) -> None:
    state = unwrap_state(state)
    matched = match_keys(state, model, spec, where)
    hint = HINT
    if mismatch(model.state_dict(), matched) and (reads_as := _reads_as(state, model)):
        hint = f"{reads_as}; {HINT}"
    load_strict(model, matched, where, f"backbone {spec.name!r}", hint, BackboneError)


def load_weights(model: nn.Module, weights: str | Path, spec) -> None:
    path = Path(weights)
    if not path.is_file():
        raise BackboneError(
            f"{path}: weights for backbone {spec.name!r} not found; fix model.weights or the weights file"
        )
    load_state(model, read_checkpoint(path), spec, path)
