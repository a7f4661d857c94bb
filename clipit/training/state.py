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
Each state file is data only: tensors plus a JSON tree in one safetensors file (clipit/training/state_files.py).

A checkpoint is written to a temporary folder and renamed, so a kill while saving leaves the previous
one intact. Loading is strict: a missing, damaged or foreign file, or a checkpoint of another config,
is a `ResumeError` naming the file; the run never restarts or resumes inexactly without saying so.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from accelerate import Accelerator

from clipit import layout
from clipit.errors import ClipitError, one_line
from clipit.identity import identity_changes
from clipit.io import atomic_write_json, read_json_object, replace_dir, sha256_file
from clipit.training.accel import uses_deepspeed
from clipit.training.state_files import (
    FORMAT,
    BadStateFile,
    check_header,
    load_tree,
    read_tensors,
    rng_state,
    save_tensors,
    save_tree,
    set_rng_state,
    use_safe_checkpoint_engine,
)

PROGRESS = "progress.json"
OLD = ".latest.old"  # where replace_dir parks the previous checkpoint during the swap
TMP_PREFIX = ".latest.tmp-"


class ResumeError(ClipitError):
    """A resume checkpoint is missing, damaged, unreadable or from another config."""


def latest_dir(run_dir: str | Path) -> Path:
    return layout.resume_dir(run_dir)


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
        save_tensors(tmp / "trainable.safetensors", trainable)
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
    except BadStateFile as err:
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
            raise BadStateFile(
                f"{path}: missing because a checkpoint save was interrupted; its newest complete "
                f"copy is {newest}: rename that folder to {path.name} to resume from it"
            )
        return None
    if not marker.exists():
        if path.is_dir() and not any(path.iterdir()):
            return None
        raise BadStateFile(f"{marker}: missing although {path} holds files (an incomplete copy of the checkpoint?)")
    progress = read_json_object(marker, error=lambda path, why: BadStateFile(f"{path}: unreadable ({why})"))
    if progress.get("format") != FORMAT:
        raise BadStateFile(
            f"{marker}: not a {FORMAT} checkpoint (an older clipit wrote it, and its .pt state files are "
            "no longer read)"
        )
    missing = [
        k for k in ("step", "best_score", "best_step", "batches_per_epoch", "world_size", "files") if k not in progress
    ]
    if missing or not isinstance(progress["files"], dict) or not isinstance(progress["step"], int):
        raise BadStateFile(f"{marker}: damaged (missing or wrong {missing or ['files/step']})")
    return progress


def _check_identity(marker: Path, progress: dict, identity: dict | None, world: int) -> None:
    if progress["world_size"] != world:
        raise BadStateFile(
            f"{marker}: written by {progress['world_size']} processes, this launch has {world}; resume with "
            f"the same number of processes",
            damaged=False,
        )
    if identity is None:
        return
    detail = identity_changes(progress.get("identity") or {}, identity)
    if detail:
        raise BadStateFile(
            f"{marker}: written for another config ({detail}); put those settings back to resume exactly",
            damaged=False,
        )


def _verify_files(path: Path, progress: dict) -> None:
    for name, digest in sorted(progress["files"].items()):
        file = path / name
        if not file.is_file():
            raise BadStateFile(f"{file}: missing from the checkpoint")
        if sha256_file(file) != digest:
            raise BadStateFile(f"{file}: damaged (its sha256 differs from the one recorded in {path / PROGRESS})")
        if file.suffix in (".safetensors", ".pt"):  # every rank checks every state file's header here, so a
            check_header(file)  # bad one stops all ranks before any collective


def _restore(path: Path, accelerator: Accelerator, model, optimizer, scheduler, generator) -> None:
    rng_file = path / f"rng-{accelerator.process_index}.safetensors"
    if uses_deepspeed(accelerator):
        use_safe_checkpoint_engine(model)
        # frozen parameters were excluded on save (they come from the weights file / warm start), so the
        # module load is partial by design: load_trainable checks that it holds every trainable tensor
        where = path / "deepspeed"
        try:
            loaded, _ = model.load_checkpoint(
                str(where), tag="state", custom_load_fn=lambda src, dst: load_trainable(src, dst, where)
            )
        except BadStateFile:
            raise
        except (RuntimeError, KeyError, ValueError, AssertionError) as err:
            raise BadStateFile(f"{where}: DeepSpeed cannot restore it ({one_line(err)})") from None
        if loaded is None:
            raise BadStateFile(f"{where}: DeepSpeed found no checkpoint in it")
    else:
        file = path / "trainable.safetensors"
        load_trainable(read_tensors(file), accelerator.unwrap_model(model), file)
        _restore_optimizer(path / "optimizer.safetensors", optimizer)
    state = load_tree(path / "scheduler.safetensors")
    try:
        scheduler.load_state_dict(state)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise BadStateFile(
            f"{path / 'scheduler.safetensors'}: does not fit this run's LR schedule ({one_line(err)})"
        ) from None
    state = load_tree(rng_file)
    try:
        set_rng_state(state, generator, accelerator.device)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise BadStateFile(f"{rng_file}: not a random-generator state ({one_line(err)})") from None


def load_trainable(saved: Mapping[str, torch.Tensor], module: torch.nn.Module, where: Path) -> None:
    """Copy a state saved without the frozen parameters into `module` (trainable.safetensors; DeepSpeed's
    module state, as its `custom_load_fn`, which also holds the buffers). It must hold every trainable
    parameter and nothing but trainable parameters and buffers of their own shapes: all is checked before
    anything is copied, so no load is partial."""
    own = module.state_dict()
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    frozen = {n for n, p in module.named_parameters() if not p.requires_grad}
    missing = [n for n in trainable if n not in saved]
    foreign = sorted(k for k, v in saved.items() if k not in own or k in frozen or own[k].shape != v.shape)
    if missing or foreign:
        raise BadStateFile(
            f"{where}: does not fit this model ({len(foreign)} foreign tensors, e.g. {foreign[:2]}; "
            f"{len(missing)} missing, e.g. {missing[:2]})"
        )
    with torch.no_grad():
        for name, value in saved.items():
            own[name].copy_(value)


def _restore_optimizer(file: Path, optimizer) -> None:
    state = load_tree(file)
    if (
        not isinstance(state, dict)
        or not isinstance(state.get("state"), dict)
        or not isinstance(state.get("param_groups"), list)
    ):
        raise BadStateFile(f"{file}: not an optimizer state")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, entries in state["state"].items():
        if not isinstance(index, int) or not 0 <= index < len(params) or not isinstance(entries, dict):
            raise BadStateFile(f"{file}: optimizer state for parameter {index!r}, which this model does not have")
        for key, value in entries.items():
            if isinstance(value, torch.Tensor) and value.dim() and value.shape != params[index].shape:
                raise BadStateFile(
                    f"{file}: optimizer state {key} of parameter {index} has shape {tuple(value.shape)}, "
                    f"the parameter {tuple(params[index].shape)}"
                )
    try:
        optimizer.load_state_dict(state)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise BadStateFile(f"{file}: does not fit this run's optimizer ({one_line(err)})") from None
