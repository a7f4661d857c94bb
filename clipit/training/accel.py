"""The Accelerator for a run, built from the run's TrainConfig only.

Precision and the distributed strategy live in one place (methods.<m>.precision / .distributed):
the accelerate settings and the DeepSpeed config are both derived from it, so they can never
disagree ("bf16 in accelerate, fp16 in the DeepSpeed JSON"). Launchers (torchrun, accelerate
launch, srun) only start processes; they must not set precision or DeepSpeed themselves.
"""
from __future__ import annotations

import os

import torch
from accelerate import Accelerator

from clipit.config import TrainConfig

PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}  # train.precision -> accelerate's name


def deepspeed_config(tcfg: TrainConfig, world_size: int = 1) -> dict:
    """ZeRO-2 settings derived from the run config (also written next to checkpoints for the record)."""
    config = {
        "train_micro_batch_size_per_gpu": tcfg.batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": tcfg.batch_size * world_size,
        "zero_optimization": {"stage": 2, "overlap_comm": False, "contiguous_gradients": True},
        "bf16": {"enabled": tcfg.precision == "bf16"},
        "fp16": {"enabled": tcfg.precision == "fp16", "auto_cast": False},
        "steps_per_print": 1 << 30,
    }
    if tcfg.grad_clip:
        config["gradient_clipping"] = tcfg.grad_clip
    return config


_CACHE: dict = {}


def make_accelerator(tcfg: TrainConfig) -> Accelerator:
    """One Accelerator per process and setting: accelerate allows a single DeepSpeed instance."""
    key = (tcfg.precision, tcfg.distributed)
    if key in _CACHE:
        return _CACHE[key]
    if _CACHE and (tcfg.distributed == "zero2" or any(k[1] == "zero2" for k in _CACHE)):
        raise ValueError(f"this process already runs {next(iter(_CACHE))}; DeepSpeed cells need a process "
                         "of their own (run them with `clipit train`, one cell per launch)")
    _CACHE[key] = _build(tcfg)
    return _CACHE[key]


def _build(tcfg: TrainConfig) -> Accelerator:
    kwargs: dict = {"cpu": not torch.cuda.is_available(), "mixed_precision": PRECISION[tcfg.precision]}
    if tcfg.distributed == "zero2":
        from accelerate.utils import DeepSpeedPlugin

        world = int(os.environ.get("WORLD_SIZE", 1))  # set by torchrun / accelerate launch / the SLURM launcher
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=deepspeed_config(tcfg, world))
        # accelerate only starts DeepSpeed's process group when this is set before its state exists, and
        # drops DeepSpeed when cpu=True; on a CPU machine DeepSpeed brings its own CPU accelerator (gloo)
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        kwargs["cpu"] = False
        if not torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
            from accelerate.state import PartialState

            PartialState(cpu=False, backend="gloo")  # with no backend accelerate would treat it as 1 process
    return Accelerator(**kwargs)


def uses_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.state.deepspeed_plugin is not None


def leave_process_group(succeeded: bool = True) -> bool:
    """End a distributed command cleanly: all ranks meet, then the process group is destroyed; returns
    whether there was one. A rank that exits with the group alive can abort in gloo's threads
    ("terminate called without an active exception") while its peers are still shutting down. A rank
    that failed skips the barrier (its peers may be stuck elsewhere) and only destroys the group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False
    if succeeded:
        dist.barrier()
    dist.destroy_process_group()
    return True
