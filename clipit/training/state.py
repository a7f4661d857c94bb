"""Resume checkpoints: everything needed to continue a run exactly where it stopped, stored as data only.

`<run_dir>/checkpoints/latest/` holds
    trainable.safetensors      the trainable tensors (LoRA + heads)
    optimizer.safetensors      the optimizer's state dict (per-parameter tensors + param-group settings)
    scheduler.safetensors      the LR scheduler's state dict (its lambda is rebuilt from the config)
    rng-<rank>.safetensors     every random generator of that rank (torch, the run's generator, numpy, python)
    deepspeed/                 under DeepSpeed: the engine's own (partitioned) checkpoint instead of the
                               first two, written and read through `SafeCheckpointEngine`
    progress.json              written last (its presence marks the checkpoint complete): the step (which
                               fixes the data position: epoch = step // batches_per_epoch), the validation
                               bookkeeping, the identity of the config that wrote it and the sha256 of
                               every file above
Each state file is a safetensors file: the tensors, plus a JSON tree (in the header's metadata) that says
where they sit among the plain values (numbers, strings, lists, tuples, dicts). Reading one never
executes code: no Python object stream is ever read, and the only objects rebuilt are the few DeepSpeed types
named in `_OBJECTS`, from plain attribute values.

A checkpoint is written to a temporary folder and renamed, so a kill while saving leaves the previous
one intact. Loading is strict: a missing, damaged or foreign file, or a checkpoint of another config,
is a `ResumeError` naming the file; the run never restarts or resumes inexactly without saying so.
"""

from __future__ import annotations

import enum
import functools
import importlib
import json
import random
import shutil
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from clipit import layout
from clipit.errors import ClipitError, one_line
from clipit.identity import identity_changes
from clipit.io import atomic_path, atomic_write_json, read_json_object, replace_dir, sha256_file
from clipit.training.accel import uses_deepspeed

FORMAT = "clipit-resume/2"  # progress.json and every state file carry it
PROGRESS = "progress.json"
TREE_KEY = "clipit.tree"
OLD = ".latest.old"  # where replace_dir parks the previous checkpoint during the swap
TMP_PREFIX = ".latest.tmp-"


class ResumeError(ClipitError):
    """A resume checkpoint is missing, damaged, unreadable or from another config."""


class _Bad(Exception):
    """A problem with one file; load_training_state adds the fix (restore the file or start over)."""

    def __init__(self, message: str, damaged: bool = True):
        super().__init__(message)
        self.damaged = damaged  # False: the checkpoint is fine, the launch differs (restoring it would not help)


def latest_dir(run_dir: str | Path) -> Path:
    return layout.resume_dir(run_dir)


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
    """The object `save_tree` wrote; `_Bad` naming the file if it is missing, damaged or not one."""
    path = Path(path)
    if not path.is_file():
        raise _Bad(f"{path}: missing")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise _Bad(f"{path}: not a readable clipit state file ({one_line(err)})") from None
    if meta.get("format") != FORMAT or TREE_KEY not in meta:
        raise _Bad(f"{path}: not a {FORMAT} state file (format {meta.get('format')!r})")
    try:
        return _decode(json.loads(meta[TREE_KEY]), tensors)
    except (ValueError, KeyError, TypeError, AttributeError, ImportError) as err:
        raise _Bad(f"{path}: damaged state file ({one_line(err)})") from None


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
# Saving and loading a checkpoint


def save_training_state(
    run_dir: str | Path,
    accelerator: Accelerator,
    model,
    optimizer,
    scheduler,
    generator: torch.Generator,
    progress: dict,
) -> Path:
    final = latest_dir(run_dir)
    tmp = final.parent / f"{TMP_PREFIX}{progress['step']}"
    if accelerator.is_main_process:
        for stale in final.parent.glob(f"{TMP_PREFIX}*"):  # left by a save that was killed
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if uses_deepspeed(accelerator):
        use_safe_checkpoint_engine(model)
        model.save_checkpoint(str(tmp / "deepspeed"), tag="state", exclude_frozen_parameters=True)
    elif accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        trainable = {n: p.detach().cpu().contiguous() for n, p in unwrapped.named_parameters() if p.requires_grad}
        with atomic_path(tmp / "trainable.safetensors") as out:
            save_file(trainable, str(out), metadata={"format": FORMAT})
        save_tree(tmp / "optimizer.safetensors", optimizer.state_dict())
    save_tree(tmp / f"rng-{accelerator.process_index}.safetensors", rng_state(generator, accelerator.device))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_tree(tmp / "scheduler.safetensors", scheduler.state_dict())
        files = {str(f.relative_to(tmp)): sha256_file(f) for f in sorted(tmp.rglob("*")) if f.is_file()}
        atomic_write_json(
            tmp / PROGRESS, {**progress, "format": FORMAT, "world_size": accelerator.num_processes, "files": files}
        )
        replace_dir(tmp, final)
    accelerator.wait_for_everyone()
    return final


def load_training_state(
    run_dir: str | Path,
    accelerator: Accelerator,
    model,
    optimizer,
    scheduler,
    generator: torch.Generator,
    identity: dict | None = None,
    fix: str = "start over with `clipit train ... --resume none`",
) -> dict | None:
    """Restore the latest checkpoint in place; returns its progress dict, or None if there is none.

    `identity` (what the run's results depend on) must equal the one the checkpoint was written with.
    Any problem is a ResumeError naming the file, ending with `fix`."""
    try:
        progress = _read_progress(latest_dir(run_dir))
        if progress is None:
            return None
        _check_identity(latest_dir(run_dir) / PROGRESS, progress, identity, accelerator.num_processes)
        _verify_files(latest_dir(run_dir), progress)
        _restore(latest_dir(run_dir), accelerator, model, optimizer, scheduler, generator)
    except _Bad as err:
        raise ResumeError(f"{err}; {'restore the checkpoint, or ' if err.damaged else 'or '}{fix}") from None
    return {k: v for k, v in progress.items() if k not in ("format", "files", "world_size")}


def _read_progress(path: Path) -> dict | None:
    """progress.json of the checkpoint at `path`; None only when there is no checkpoint at all."""
    marker = path / PROGRESS
    if not path.exists():
        if (path.parent / OLD).exists():  # killed between the two renames of replace_dir
            complete = sorted(
                (d for d in path.parent.glob(f"{TMP_PREFIX}*") if (d / PROGRESS).exists()),
                key=lambda d: int(d.name[len(TMP_PREFIX) :]) if d.name[len(TMP_PREFIX) :].isdigit() else -1,
            )
            newest = complete[-1] if complete else path.parent / OLD
            raise _Bad(
                f"{path}: missing because a checkpoint save was interrupted; its newest complete "
                f"copy is {newest}: rename that folder to {path.name} to resume from it"
            )
        return None
    if not marker.exists():
        if path.is_dir() and not any(path.iterdir()):
            return None
        raise _Bad(f"{marker}: missing although {path} holds files (an incomplete copy of the checkpoint?)")
    progress = read_json_object(marker, error=lambda path, why: _Bad(f"{path}: unreadable ({why})"))
    if progress.get("format") != FORMAT:
        raise _Bad(
            f"{marker}: not a {FORMAT} checkpoint (an older clipit wrote it, and its .pt state files are "
            "no longer read)"
        )
    missing = [
        k for k in ("step", "best_score", "best_step", "batches_per_epoch", "world_size", "files") if k not in progress
    ]
    if missing or not isinstance(progress["files"], dict) or not isinstance(progress["step"], int):
        raise _Bad(f"{marker}: damaged (missing or wrong {missing or ['files/step']})")
    return progress


def _check_identity(marker: Path, progress: dict, identity: dict | None, world: int) -> None:
    if progress["world_size"] != world:
        raise _Bad(
            f"{marker}: written by {progress['world_size']} processes, this launch has {world}; resume with "
            f"the same number of processes",
            damaged=False,
        )
    if identity is None:
        return
    detail = identity_changes(progress.get("identity") or {}, identity)
    if detail:
        raise _Bad(
            f"{marker}: written for another config ({detail}); put those settings back to resume exactly",
            damaged=False,
        )


def _verify_files(path: Path, progress: dict) -> None:
    for name, digest in sorted(progress["files"].items()):
        file = path / name
        if not file.is_file():
            raise _Bad(f"{file}: missing from the checkpoint")
        if sha256_file(file) != digest:
            raise _Bad(f"{file}: damaged (its sha256 differs from the one recorded in {path / PROGRESS})")
        if file.suffix in (".safetensors", ".pt"):  # every rank checks every state file's header here, so a
            _check_header(file)  # bad one stops all ranks before any collective


def _check_header(file: Path) -> None:
    try:
        with safe_open(str(file), framework="pt", device="cpu") as fh:
            meta = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise _Bad(f"{file}: not a readable clipit state file ({one_line(err)})") from None
    if meta.get("format") != FORMAT:
        raise _Bad(f"{file}: not a {FORMAT} state file (format {meta.get('format')!r})")


def _restore(path: Path, accelerator: Accelerator, model, optimizer, scheduler, generator) -> None:
    rng_file = path / f"rng-{accelerator.process_index}.safetensors"
    if uses_deepspeed(accelerator):
        use_safe_checkpoint_engine(model)
        # frozen parameters were excluded on save (they come from the weights file / warm start), so the
        # module load is partial by design: load_trainable checks that it holds every trainable tensor
        where = path / "deepspeed"
        try:
            loaded, _ = model.load_checkpoint(
                str(where),
                tag="state",
                load_module_strict=False,
                custom_load_fn=lambda src, dst: load_trainable(src, dst, where),
            )
        except _Bad:
            raise
        except (RuntimeError, KeyError, ValueError, AssertionError) as err:
            raise _Bad(f"{where}: DeepSpeed cannot restore it ({one_line(err)})") from None
        if loaded is None:
            raise _Bad(f"{where}: DeepSpeed found no checkpoint in it")
    else:
        _restore_module(path / "trainable.safetensors", accelerator.unwrap_model(model))
        _restore_optimizer(path / "optimizer.safetensors", optimizer)
    state = load_tree(path / "scheduler.safetensors")
    try:
        scheduler.load_state_dict(state)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise _Bad(f"{path / 'scheduler.safetensors'}: does not fit this run's LR schedule ({one_line(err)})") from None
    state = load_tree(rng_file)
    try:
        set_rng_state(state, generator, accelerator.device)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise _Bad(f"{rng_file}: not a random-generator state ({one_line(err)})") from None


def load_trainable(saved: dict, module: torch.nn.Module, where: Path) -> None:
    """DeepSpeed's module load (its `custom_load_fn`): a state saved without the frozen parameters must
    hold every trainable parameter of `module` and nothing `module` lacks; a non-strict load would
    silently leave a missing tensor at its initial value."""
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    missing = [n for n in trainable if n not in saved]
    unexpected = sorted(set(saved) - set(module.state_dict()))
    if missing or unexpected:
        raise _Bad(
            f"{where}: does not fit this model ({len(unexpected)} foreign tensors, e.g. {unexpected[:2]}; "
            f"{len(missing)} missing, e.g. {missing[:2]})"
        )
    module.load_state_dict(saved, strict=False)


def _restore_module(file: Path, module: torch.nn.Module) -> None:
    saved = _read_tensors(file)
    own = dict(module.named_parameters())
    trainable = {n for n, p in own.items() if p.requires_grad}
    wrong = sorted(k for k, v in saved.items() if k not in trainable or own[k].shape != v.shape)
    missing = sorted(trainable - set(saved))
    if wrong or missing:
        raise _Bad(
            f"{file}: does not fit this model ({len(wrong)} foreign or reshaped tensors, e.g. {wrong[:2]}; "
            f"{len(missing)} missing, e.g. {missing[:2]})"
        )
    with torch.no_grad():
        for name, value in saved.items():
            own[name].copy_(value)


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    """A plain safetensors file of named tensors (trainable.safetensors); `_Bad` naming it if unreadable."""
    if not file.is_file():
        raise _Bad(f"{file}: missing")
    try:
        with safe_open(str(file), framework="pt", device="cpu") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise _Bad(f"{file}: not a readable safetensors file ({one_line(err)})") from None


def _restore_optimizer(file: Path, optimizer) -> None:
    state = load_tree(file)
    if (
        not isinstance(state, dict)
        or not isinstance(state.get("state"), dict)
        or not isinstance(state.get("param_groups"), list)
    ):
        raise _Bad(f"{file}: not an optimizer state")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, entries in state["state"].items():
        if not isinstance(index, int) or not 0 <= index < len(params) or not isinstance(entries, dict):
            raise _Bad(f"{file}: optimizer state for parameter {index!r}, which this model does not have")
        for key, value in entries.items():
            if isinstance(value, torch.Tensor) and value.dim() and value.shape != params[index].shape:
                raise _Bad(
                    f"{file}: optimizer state {key} of parameter {index} has shape {tuple(value.shape)}, "
                    f"the parameter {tuple(params[index].shape)}"
                )
    try:
        optimizer.load_state_dict(state)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise _Bad(f"{file}: does not fit this run's optimizer ({one_line(err)})") from None
