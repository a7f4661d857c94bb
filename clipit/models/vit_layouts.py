"""ViT checkpoint layouts, converted to timm's keys before the strict load.

| layout | recognised by | where such files come from |
|---|---|---|
| timm | `cls_token`, `blocks.N.attn.qkv.weight` | timm / hf-hub timm files, kaiko.ai, UNI, eva and Lightning checkpoints |
| Meta DINOv2 | timm's names + `mask_token` (and `register_tokens`, `mlp.w12/w3`, `blocks.C.N.` chunks) | facebookresearch/dinov2 `.pth` |
| HF Dinov2Model | `embeddings.cls_token`, `encoder.layer.N.attention.attention.query.weight` | facebook/dinov2-* (transformers) |

Meta's layout is converted as timm's `checkpoint_filter_fn` does it (registers: the class token absorbs
its position embedding, which the timm `reg4` models do not have); the HF layout is first renamed to
Meta's. The position grid is then resampled to the model's input size as timm does it
(`resample_abs_pos_embed`, bicubic with antialiasing, prefix tokens kept). A checkpoint whose register
tokens do not match the model is refused in one line that says which backbone fits it.
"""

from __future__ import annotations

import math
import re

import timm
import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

TIMM, META, HF = "timm", "Meta DINOv2", "HF transformers Dinov2Model"

# (HF pattern, Meta name), for the checkpoint names of transformers 4 and the module names of transformers 5;
# several sources of one target (query/key/value, gate/up) stack in _STACK_ORDER
_HF_RENAMES = [
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.mask_token$", "mask_token"),
    (r"^embeddings\.register_tokens$", "register_tokens"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.(?:attention\.(?:query|key|value)|[qkv]_proj)\.", r"blocks.\1.attn.qkv."),
    (r"^encoder\.layer\.(\d+)\.attention\.(?:output\.dense|o_proj)\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1$", r"blocks.\1.ls\2.gamma"),
    (r"^encoder\.layer\.(\d+)\.mlp\.(?:weights_in|gate_proj|up_proj)\.", r"blocks.\1.mlp.w12."),  # SwiGLU
    (r"^encoder\.layer\.(\d+)\.mlp\.(?:weights_out|down_proj)\.", r"blocks.\1.mlp.w3."),
    (r"^encoder\.layer\.(\d+)\.", r"blocks.\1."),  # norm1, norm2, mlp.fc1, mlp.fc2
    (r"^layernorm\.", "norm."),
]
_STACK_ORDER = (".query.", ".key.", ".value.", ".q_proj.", ".k_proj.", ".v_proj.", ".gate_proj.", ".up_proj.")
_META_RENAMES = [
    (r"^blocks\.\d+\.(\d+)\.", r"blocks.\1."),  # block chunks (FSDP): blocks.<chunk>.<global index>.
    (r"^(blocks\.\d+\.mlp\.)w12\.", r"\1fc1."),
    (r"^(blocks\.\d+\.mlp\.)w3\.", r"\1fc2."),
]


def _rename(key: str, rules) -> str:
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


def detect(keys) -> str | None:
    """The layout of a prefix-free key set: TIMM, META, HF, or None (not a ViT we convert)."""
    keys = set(keys)
    if "embeddings.cls_token" in keys or any(k.startswith("encoder.layer.0.attention.") for k in keys):
        return HF
    if "cls_token" in keys or "pos_embed" in keys:
        return META if "mask_token" in keys or "register_tokens" in keys else TIMM
    return None


def timm_name(key: str, layout: str | None) -> str:
    """The timm key a checkpoint key becomes (for choosing the wrapper prefix before converting)."""
    if layout == HF:
        key = _rename(key, _HF_RENAMES)
    return _rename(key, _META_RENAMES) if layout in (HF, META) else key


def hf_to_meta(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an HF Dinov2Model state to Meta's keys; query, key and value stack into one qkv (and SwiGLU's
    gate and up projections into w12), as Meta's fused layers hold them."""
    groups: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for key, value in state.items():
        rank = next((i for i, part in enumerate(_STACK_ORDER) if part in key), -1)
        groups.setdefault(_rename(key, _HF_RENAMES), []).append((rank, value))
    return {
        key: parts[0][1] if len(parts) == 1 else torch.cat([v for _, v in sorted(parts, key=lambda p: p[0])])
        for key, parts in groups.items()
    }


def meta_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's `_convert_dinov2`: drop the mask token; with registers the class token absorbs its position
    embedding and the grid keeps the patches only (timm's reg models have no_embed_class)."""
    state = {_rename(k, _META_RENAMES): v for k, v in state.items() if k != "mask_token"}
    if "register_tokens" in state:
        state["reg_token"] = state.pop("register_tokens")
        if "pos_embed" in state and "cls_token" in state:
            state["cls_token"] = state["cls_token"] + state["pos_embed"][:, :1]
            state["pos_embed"] = state["pos_embed"][:, 1:]
    return state


def to_timm(state: dict[str, torch.Tensor], layout: str | None) -> dict[str, torch.Tensor]:
    if layout == HF:
        state = hf_to_meta(state)
    return meta_to_timm(state) if layout in (HF, META) else state


def is_vit(model: nn.Module) -> bool:
    return isinstance(model, timm.models.vision_transformer.VisionTransformer)


def registers(state) -> int:
    """Register tokens of a timm-keyed state dict (or of a model's)."""
    reg = state.get("reg_token")
    return int(reg.shape[1]) if reg is not None else 0


def describe(state) -> str:
    """'12 blocks, width 384, 4 register tokens' for a timm-keyed state dict; '' for a non-ViT."""
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    token = state.get("cls_token", state.get("pos_embed"))
    if token is None or not blocks:
        return ""
    regs = registers(state)
    return f"{len(blocks)} blocks, width {token.shape[-1]}" + (f", {regs} register tokens" if regs else "")


def family(layout: str | None, arch: str) -> str:
    return "DINOv2" if layout in (META, HF) or "dinov2" in arch else "ViT"


def register_mismatch(state: dict, model: nn.Module, layout: str | None, name: str, arch: str) -> str:
    """'' when the checkpoint's register tokens fit the model, else the one-line reason and the fix."""
    have, need = registers(state), getattr(model, "num_reg_tokens", 0)
    if have == need or "cls_token" not in state:
        return ""
    what = family(layout, arch)
    found = f"a {what} checkpoint " + (f"with {have} register tokens" if have else "without register tokens")
    other = re.sub(r"_reg\d+", "", arch) if not have else re.sub(r"(patch\d+)_", rf"\1_reg{have}_", arch, count=1)
    fix = f"use backbone timm:{other} for this checkpoint" if other != arch and timm.is_model(other) else ""
    needed = f"one with {need} register tokens" if need else f"a {what} checkpoint without register tokens"
    return (
        f"looks like {found} ({layout or 'unrecognised'} layout, {describe(state)}); backbone {name!r} "
        f"({arch}) needs {needed}" + (f": point model.weights at that, or {fix}" if fix else "")
    )


def fit_pos_embed(state: dict[str, torch.Tensor], model: nn.Module) -> str:
    """Resample the checkpoint's position grid to the model's, in place, as timm does; returns '' or why not."""
    pos, own = state.get("pos_embed"), getattr(model, "pos_embed", None)
    if pos is None or own is None or pos.dim() != 3 or pos.shape == own.shape or pos.shape[-1] != own.shape[-1]:
        return ""  # nothing to do, or a width mismatch the strict load reports
    prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    side = math.isqrt(max(pos.shape[1] - prefix, 0))
    if side * side != pos.shape[1] - prefix or side == 0:
        return (
            f"its position embedding has {pos.shape[1]} tokens, not {prefix} prefix tokens + a square grid "
            f"(the model has {own.shape[1]})"
        )
    state["pos_embed"] = resample_abs_pos_embed(
        pos, new_size=list(model.patch_embed.grid_size), old_size=[side, side], num_prefix_tokens=prefix
    )
    return ""
