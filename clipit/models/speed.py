"""GPU speed settings of a built model: gradient checkpointing and torch.compile (`model.*` in the config).

Both act on the two heavy parts only, the vision backbone and the trainable text tower (the heads are a
few matmuls), and both leave the state_dict's keys as they are, so checkpoints, warm starts, feature-cache
keys and exports do not depend on them:
  * gradient checkpointing: timm ViTs (every timm backbone, CONCH's trunk) through their own
    `set_grad_checkpointing` (non-reentrant); a text tower's transformer blocks (open_clip, CONCH) are
    wrapped here with non-reentrant checkpointing, because CONCH's own switch uses the reentrant
    variant, which gives no gradient to LoRA inside a block when the block's input needs none.
  * compile: `nn.Module.compile` in place (the module's own forward stays, state_dict keys get no
    `_orig_mod.` prefix).
"""

from __future__ import annotations

import types

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from clipit.config import ConfigError, ModelConfig

HEAVY_PARTS = ("backbone", "text_tower")


def heavy_parts(model: nn.Module) -> dict[str, nn.Module]:
    """The backbone and text tower a model has (a text-only classifier has neither)."""
    return {name: getattr(model, name) for name in HEAVY_PARTS if isinstance(getattr(model, name, None), nn.Module)}


def apply_speed_settings(model: nn.Module, mcfg: ModelConfig) -> nn.Module:
    """Gradient checkpointing, then compilation, as `mcfg` asks (after LoRA is injected)."""
    parts = heavy_parts(model)
    if mcfg.gradient_checkpointing:
        for name, part in parts.items():
            enable_gradient_checkpointing(
                part,
                f"model.gradient_checkpointing: the {name} ({mcfg.backbone if name == 'backbone' else 'pairing model text tower'})",
            )
    if mcfg.compile:
        for part in parts.values():
            part.compile(mode=None if mcfg.compile_mode == "default" else mcfg.compile_mode)
    return model


def enable_gradient_checkpointing(module: nn.Module, what: str = "this model") -> None:
    """Turn on per-block activation recomputation, or raise a one-line ConfigError."""
    for candidate in (module, getattr(module, "trunk", None)):  # ConchVision holds a timm ViT as `trunk`
        if (
            candidate is not None
            and callable(getattr(candidate, "set_grad_checkpointing", None))
            and hasattr(candidate, "blocks")
        ):
            candidate.set_grad_checkpointing(True)
            return
    blocks = _text_blocks(module)
    if blocks is None:
        raise ConfigError(
            f"{what}: {type(module).__name__} has no transformer blocks to checkpoint; set "
            "model.gradient_checkpointing: false"
        )
    for block in blocks:
        checkpoint_forward(block)


def _text_blocks(module: nn.Module):
    """The residual blocks of an open_clip/CONCH text transformer inside a TextTower (or a bare CLIP)."""
    clip = getattr(module, "clip", module)
    for owner in (getattr(clip, "text", None), clip):
        transformer = getattr(owner, "transformer", None) if owner is not None else None
        blocks = getattr(transformer, "resblocks", None)
        if isinstance(blocks, (nn.ModuleList, nn.Sequential)) and len(blocks):
            return blocks
    return None


def checkpoint_forward(block: nn.Module) -> None:
    """Make `block` recompute its activations in backward (non-reentrant; only while grad is enabled)."""
    if getattr(block, "_clipit_checkpointed", False):
        return
    inner = block.forward

    def forward(self, *args, **kwargs):
        if torch.is_grad_enabled():
            return checkpoint(inner, *args, use_reentrant=False, **kwargs)
        return inner(*args, **kwargs)

    block.forward = types.MethodType(forward, block)
    block._clipit_checkpointed = True
