"""The resume checkpoint's state files, data only: tensors plus a JSON tree in one safetensors file.

Each state file is a safetensors file: the tensors, plus a JSON tree (in the header's metadata) that says
where they sit among the plain values (numbers, strings, lists, tuples, dicts). Reading one never
executes code: no Python object stream is ever read, and the only objects rebuilt are the few DeepSpeed types
named in `_OBJECTS`, from plain attribute values. DeepSpeed's own checkpoint files go through the same
format (`SafeCheckpointEngine`); a rank's random generators are one such tree (`rng_state`). What a
checkpoint folder holds and how it is verified and restored: clipit/training/state.py.
"""

from __future__ import annotations

import enum
import functools
import importlib
import json
import random
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from clipit.errors import one_line
from clipit.io import atomic_path

FORMAT = "clipit-resume/2"  # progress.json and every state file carry it
TREE_KEY = "clipit.tree"


class BadStateFile(Exception):
    """A problem with one file; load_training_state adds the fix (restore the file or start over)."""

    def __init__(self, message: str, damaged: bool = True):
        super().__init__(message)
        self.damaged = damaged  # False: the checkpoint is fine, the launch differs (restoring it would not help)


# ---------------------------------------------------------------------------------------------
# Tensors + a JSON tree in one safetensors file

# The only non-container objects a state file may hold besides tensors: what DeepSpeed's ZeRO-1/2
# optimizer stores. They are rebuilt from this list (never from a name the file supplies alone).
_OBJECTS = {
    "deepspeed.runtime.zero.config.ZeroStageEnum": "enum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler": "attrs",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler": "attrs",
    "deepspeed.utils.tensor_fragment.fragment_address": "attrs",
}
_PLAIN = (str, int, float, bool, type(None))


def _type_name(obj) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _encode(obj, tensors: dict):
    """JSON-able tree of `obj`; tensors go to `tensors` (named by position) and are referenced."""
    if isinstance(obj, torch.Tensor):
        key = str(len(tensors))
        value = obj.detach()
        tensors[key] = (value.cpu() if value.device.type != "cpu" else value.clone()).contiguous()
        return {"__t__": "tensor", "k": key}
    name = _type_name(obj)
    if name in _OBJECTS:
        if _OBJECTS[name] == "enum":
            return {"__t__": "enum", "type": name, "v": _encode(obj.value, tensors)}
        return {"__t__": "obj", "type": name, "v": _encode(dict(vars(obj)), tensors)}
    if isinstance(obj, enum.Enum):
        raise TypeError(f"resume state holds an enum of type {name}, which clipit cannot store")
    if isinstance(obj, _PLAIN):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, torch.dtype):
        return {"__t__": "dtype", "v": str(obj).removeprefix("torch.")}
    if isinstance(obj, torch.Size):
        return {"__t__": "size", "v": list(obj)}
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "biuf":
            raise TypeError(f"resume state holds a numpy array of dtype {obj.dtype}, which clipit cannot store")
        return {"__t__": "ndarray", "dtype": obj.dtype.str, "shape": list(obj.shape), "v": obj.ravel().tolist()}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return {"__t__": "tuple", "v": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, (set, frozenset)):
        return {"__t__": "set", "v": [_encode(v, tensors) for v in sorted(obj, key=repr)]}
    if isinstance(obj, dict):
        items = [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]
        if type(obj) is dict and all(isinstance(k, str) for k in obj) and "__t__" not in obj:
            return {k: v for (k, _), (_, v) in zip(obj.items(), items)}
        return {"__t__": "odict" if isinstance(obj, OrderedDict) else "dict", "v": items}
    raise TypeError(f"resume state holds a {name}, which clipit cannot store as data")


@functools.cache
def _allowed_class(name: str):
    module, _, qualname = name.rpartition(".")
    return getattr(importlib.import_module(module), qualname)


def _decode(node, tensors: dict):
    if isinstance(node, list):
        return [_decode(v, tensors) for v in node]
    if not isinstance(node, dict):
        return node
    kind = node.get("__t__")
    if kind is None:
        return {k: _decode(v, tensors) for k, v in node.items()}
    value = node.get("v")
    if kind == "tensor":
        return tensors[node["k"]]
    if kind == "tuple":
        return tuple(_decode(v, tensors) for v in value)
    if kind == "size":
        return torch.Size(int(v) for v in value)
    if kind == "set":
        return {_decode(v, tensors) for v in value}
    if kind in ("dict", "odict"):
        pairs = [(_decode(k, tensors), _decode(v, tensors)) for k, v in value]
        return OrderedDict(pairs) if kind == "odict" else dict(pairs)
    if kind == "dtype":
        dtype = getattr(torch, str(value), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype {value!r}")
        return dtype
    if kind == "ndarray":
        return np.asarray(value, dtype=np.dtype(node["dtype"])).reshape(node["shape"])
    if kind in ("enum", "obj"):
        name = node.get("type")
        if name not in _OBJECTS or _OBJECTS[name] != ("enum" if kind == "enum" else "attrs"):
            raise ValueError(f"object of type {name!r}, which a clipit resume file may not hold")
        cls = _allowed_class(name)
        if kind == "enum":
            return cls(_decode(value, tensors))
        attrs = _decode(value, tensors)
        if not isinstance(attrs, dict) or not all(isinstance(k, str) for k in attrs):
            raise ValueError(f"bad attributes for {name}")
        obj = cls.__new__(cls)  # no __init__, no __setstate__: plain attributes only
        obj.__dict__.update(attrs)
        return obj
    raise ValueError(f"unknown node kind {kind!r}")


def save_tree(path: str | Path, obj) -> None:
    """Write `obj` (tensors inside dicts, lists, tuples and plain values) as one safetensors file."""
    tensors: dict = {}
    tree = _encode(obj, tensors)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT, TREE_KEY: json.dumps(tree)})


def load_tree(path: str | Path):
    """The object `save_tree` wrote; `BadStateFile` naming the file if it is missing, damaged or not one."""
    path = Path(path)
    if not path.is_file():
        raise BadStateFile(f"{path}: missing")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise BadStateFile(f"{path}: not a readable clipit state file ({one_line(err)})") from None
    if meta.get("format") != FORMAT or TREE_KEY not in meta:
        raise BadStateFile(f"{path}: not a {FORMAT} state file (format {meta.get('format')!r})")
    try:
        return _decode(json.loads(meta[TREE_KEY]), tensors)
    except (ValueError, KeyError, TypeError, AttributeError, ImportError) as err:
        raise BadStateFile(f"{path}: damaged state file ({one_line(err)})") from None


# ---------------------------------------------------------------------------------------------
# DeepSpeed: its checkpoint files, through the same format


@functools.cache
def _safe_engine_class():
    from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

    class SafeCheckpointEngine(CheckpointEngine):
        """DeepSpeed's checkpoint I/O as safetensors + JSON trees: its stock engine reads with a full
        torch.load, which runs whatever code a file carries."""

        def __init__(self, config_params=None):
            super().__init__(config_params)
            self.name = "ClipitSafeCheckpointEngine"

        def create(self, info):
            pass

        def save(self, state_dict, path: str):
            save_tree(path, state_dict)

        def load(self, path: str, map_location=None):
            return load_tree(path)  # tensors come back on the CPU, as DeepSpeed's map_location asks

        def commit(self, info):
            return True

        def preserves_storage_sharing(self):
            return False  # save_tree stores every tensor on its own (no shared storages)

    return SafeCheckpointEngine


def use_safe_checkpoint_engine(engine) -> None:
    """Make a DeepSpeed engine save and load its checkpoints through `SafeCheckpointEngine`."""
    cls = _safe_engine_class()
    if not isinstance(getattr(engine, "checkpoint_engine", None), cls):
        engine.checkpoint_engine = cls()


# ---------------------------------------------------------------------------------------------
# RNG state


def rng_state(generator: torch.Generator, device: torch.device | None = None) -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)  # dropout on the device (LoRA dropout)
    return state


def set_rng_state(state: dict, generator: torch.Generator, device: torch.device | None = None) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


# ---------------------------------------------------------------------------------------------
# Plain named tensors (trainable.safetensors) and the header every state file carries


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    with atomic_path(path) as out:
        save_file(tensors, str(out), metadata={"format": FORMAT})


def read_tensors(file: Path) -> dict[str, torch.Tensor]:
    """A plain safetensors file of named tensors (trainable.safetensors); `BadStateFile` naming it if unreadable."""
    if not file.is_file():
        raise BadStateFile(f"{file}: missing")
    try:
        with safe_open(str(file), framework="pt", device="cpu") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise BadStateFile(f"{file}: not a readable safetensors file ({one_line(err)})") from None


def check_header(file: Path) -> None:
    """`BadStateFile` unless `file` is a safetensors file of this format (its tensors are not read)."""
    try:
        with safe_open(str(file), framework="pt", device="cpu") as fh:
            meta = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise BadStateFile(f"{file}: not a readable clipit state file ({one_line(err)})") from None
    if meta.get("format") != FORMAT:
        raise BadStateFile(f"{file}: not a {FORMAT} state file (format {meta.get('format')!r})")
