"""A unimodal probe imported instead of trained (`methods.<m>.head_from`): the linear head of an existing
kaiko eva probe checkpoint (or any file holding one Linear head) on the same frozen backbone.

The head is written as the run's best checkpoint, with the same run files as a trained probe, so
evaluation, export and CLIP-IT's warm start use it unchanged. Files are read without running code from
them: safetensors, or a PyTorch/Lightning checkpoint through `torch.load(weights_only=True)`. eva's
binary heads (one logit, BCE; PatchCamelyon) become the equivalent two-class head: logits [0, z] give
softmax probabilities [1 - sigmoid(z), sigmoid(z)].
"""

from __future__ import annotations

from pathlib import Path

import torch

from clipit.config import ExperimentConfig
from clipit.errors import ClipitError, one_line
from clipit.io import sha256_file
from clipit.models.checkpoint import read_tensors
from clipit.training.run_files import save_as_built


class HeadImportError(ClipitError):
    """The probe checkpoint named by head_from cannot give this run's head."""


def read_head_file(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a head checkpoint (the Lightning `state_dict` when it is one)."""
    if not path.is_file():
        raise HeadImportError(f"{path}: not found (methods.<m>.head_from); point it at the probe's checkpoint file")
    if path.suffix == ".safetensors":
        return read_tensors(path, HeadImportError)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise HeadImportError(
            f"{path}: not loadable as plain tensors ({one_line(err)[:200]}); save its head as "
            "safetensors (safetensors.torch.save_file({'head.weight': W, 'head.bias': b}, F))"
        ) from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise HeadImportError(f"{path}: holds no state dict of tensors")
    return {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def find_linear_head(state: dict[str, torch.Tensor], path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [C, D], bias [C]) of the file's one Linear head: `head.weight`/`head.bias` (eva's
    HeadModule), else the only 2-d weight with a matching bias."""
    if "head.weight" in state and "head.bias" in state:
        return state["head.weight"], state["head.bias"]
    pairs = [
        k[: -len(".weight")]
        for k, v in state.items()
        if k.endswith(".weight") and v.dim() == 2 and f"{k[: -len('.weight')]}.bias" in state
    ]
    if len(pairs) != 1:
        raise HeadImportError(
            f"{path}: expected one Linear head (head.weight, head.bias), found "
            f"{len(pairs)} candidates among {sorted(state)[:8]}; only linear probes can be imported"
        )
    return state[f"{pairs[0]}.weight"], state[f"{pairs[0]}.bias"]


def import_probe_head(
    cfg: ExperimentConfig, method: str, seed: int, run_dir: Path, model, preprocess, manifest: dict, accelerator
) -> dict:
    tcfg = cfg.methods[method]
    path = Path(tcfg.head_from)
    weight, bias = find_linear_head(read_head_file(path), path)
    classes = manifest["classes"]
    head = model.head
    if weight.shape[1] != head.in_features:
        raise HeadImportError(
            f"{path}: the head takes {weight.shape[1]}-d features but {cfg.model.backbone} gives "
            f"{head.in_features}-d ones; import a probe trained on this backbone"
        )
    if weight.shape[0] == 1 and len(classes) == 2:  # binary BCE head -> the equivalent softmax head
        weight = torch.cat([torch.zeros_like(weight), weight])
        bias = torch.cat([torch.zeros_like(bias), bias])
    if weight.shape[0] != len(classes):
        raise HeadImportError(
            f"{path}: the head has {weight.shape[0]} outputs but the shards have {len(classes)} "
            f"classes ({', '.join(classes)})"
        )
    with torch.no_grad():
        head.weight.copy_(weight.to(head.weight.dtype))
        head.bias.copy_(bias.to(head.bias.dtype))
    source = {"head_from": str(path.absolute()), "sha256": sha256_file(path)}
    for p in head.parameters():  # saved like a trained probe's head (only trainable tensors are stored)
        p.requires_grad_(True)
    return save_as_built(
        cfg,
        method,
        seed,
        run_dir,
        model,
        preprocess,
        manifest,
        accelerator,
        summary_extra={"imported": source},
        meta_extra={"imported": source},
        full=cfg.model.weights in (None, "random"),
        message=f"head imported from {path}",
    )
