"""Model checkpoints: safetensors weights + a JSON sidecar that says how to rebuild the model.

Only what training changes is stored (LoRA, heads) unless the backbone has no weights file to
rebuild it from (random init: demo and tests), in which case the full state is stored. Of a
trainable text tower only the LoRA tensors are stored, never its base weights (also not under
finetune: full): evaluation and export do not use the tower, and its frozen weights come from the
pairing checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from clipit.errors import ClipitError, one_line
from clipit.io import atomic_path, atomic_write_json, read_json
from clipit.state_dict import copy_matching


class CheckpointError(ClipitError):
    """A run's checkpoint does not fit the model rebuilt from its config."""


TEXT_TOWER = "text_tower."  # the training-only text side of CLIP-IT (text_encoder: tower)


def save_model(path: str | Path, model: torch.nn.Module, meta: dict, full: bool) -> None:
    path = Path(path)
    # CLIP baselines: the CLIP's checkpoint rebuilds the towers (clipit/models/clip_baselines.py)
    full = full and not getattr(getattr(model, "backbone", None), "weights_from_clip", False)
    # what training changed, plus buffers a model must keep (a CLIP baseline's cached class embeddings)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad} | set(getattr(model, "always_saved", ()))
    state = {
        k: v.detach().cpu().contiguous()
        for k, v in model.state_dict().items()
        if (k in trainable or full) and (not k.startswith(TEXT_TOWER) or "lora_" in k)
    }
    with atomic_path(path.with_suffix(".safetensors")) as tmp:
        save_file(state, str(tmp))
    atomic_write_json(path.with_suffix(".json"), {**meta, "full_state": full})  # sidecar last: marks completion


def load_model_state(
    path: str | Path, model: torch.nn.Module, prefixes: tuple[str, ...] | None = None, exclude: tuple[str, ...] = ()
) -> list[str]:
    """Load saved tensors into `model` (optionally only keys under `prefixes`, never those under
    `exclude`); returns loaded keys.

    Every saved key must exist in the model with the same shape: silent partial loads hide bugs.
    """
    path = Path(path)
    state = read_tensors(path.with_suffix(".safetensors"), CheckpointError)
    if prefixes:
        state = {k: v for k, v in state.items() if k.startswith(prefixes)}
    if exclude:
        state = {k: v for k, v in state.items() if not k.startswith(exclude)}
    return copy_matching(
        model,
        state,
        path.with_suffix(".safetensors"),
        "was it trained with another backbone or LoRA config?",
        CheckpointError,
    )


def read_tensors(
    file: str | Path, error: type[Exception] = None, fix: str = "train the run first (or restore the file)"
) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; anything else (a truncated file, a file of another format, a
    Python object stream) is `error` naming the file and `fix`. safetensors never executes code from a file."""
    error = error or CheckpointError
    file = Path(file)
    if not file.exists():
        raise error(f"{file}: missing; {fix}")
    if not file.is_file():
        raise error(f"{file}: not a regular file; {fix}")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as err:
        raise error(f"{file}: not a readable safetensors file ({one_line(err)}); {fix}") from None


def read_meta(path: str | Path) -> dict:
    file = Path(path).with_suffix(".json")
    try:
        meta = read_json(file)
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing; train the run first (or restore the file)") from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{file}: unreadable ({one_line(err)}); restore it, or retrain the run") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{file}: not a checkpoint sidecar (a JSON object); restore it, or retrain the run")
    return meta
