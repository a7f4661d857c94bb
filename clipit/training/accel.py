"""The Accelerator for a run, built from the run's TrainConfig only.

Precision and the distributed strategy live in one place (methods.<m>.precision / .distributed):
the accelerate settings and the DeepSpeed config are both derived from it, so they can never
disagree ("bf16 in accelerate, fp16 in the DeepSpeed JSON"). Launchers (torchrun, accelerate
launch, srun) only start processes; they must not set precision or DeepSpeed themselves.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator

from clipit.config import ConfigError, TrainConfig
from clipit.locks import LockError, exclusive

PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}  # methods.<m>.precision -> accelerate's name


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


ONE_CELL_PER_PROCESS = (
    "accelerate keeps one state per process and ties one DeepSpeed engine to it, so each cell (method and "
    "seed) runs in a process of its own: `clipit train --config C --method M --seed S`, or a chain "
    "(demo, several seeds, a grid task), which starts one process per cell"
)


def claim_deepspeed_run(accelerator: Accelerator, run: str) -> None:
    """Refuse (one line) a second DeepSpeed run in this process, before its model is prepared: accelerate
    would keep driving the first run's engine, and its backward fails deep inside DeepSpeed. The run is
    recorded on accelerate's own per-process state, which holds that engine."""
    if accelerator.state.deepspeed_plugin is None:
        return
    first = getattr(accelerator.state, "clipit_deepspeed_run", None)
    if first is not None and first != run:
        raise ConfigError(f"{run}: this process already trained {first} under DeepSpeed; {ONE_CELL_PER_PROCESS}")
    accelerator.state.clipit_deepspeed_run = run


def make_accelerator(tcfg: TrainConfig, log_with: list[str] | None = None) -> Accelerator:
    """The cell's Accelerator (`log_with`: accelerate's trackers, clipit/training/trackers.py). A second call
    in the process (evaluation after training) shares accelerate's process state, which must have been made
    for the same settings; they are recorded on that state (under DeepSpeed accelerate itself keeps no
    precision: the DeepSpeed config has it)."""
    from accelerate.state import AcceleratorState

    want = {"distributed": tcfg.distributed, "precision": tcfg.precision}
    state = AcceleratorState._shared_state  # accelerate's per-process state; empty until the first Accelerator
    if not state:
        accelerator = _build(tcfg, log_with)
        accelerator.state.clipit_settings = want
        return accelerator
    have = state.get("clipit_settings")
    if have != want:
        now = ", ".join(f"{k}={v}" for k, v in (have or {"settings": "unknown"}).items())
        raise ConfigError(
            f"this process already runs {now}; a cell with distributed={want['distributed']}, "
            f"precision={want['precision']} needs its own: {ONE_CELL_PER_PROCESS}"
        )
    return Accelerator(
        cpu=state.get("_cpu", False), mixed_precision=PRECISION[tcfg.precision], log_with=log_with or None
    )  # plugins: from the state


def launcher_settings(parent_cmdline: list[str] | None = None) -> dict | None:
    """The settings `accelerate launch` was given when it started this process: its own flags on the parent's
    command line over its --config_file's keys (flag names without dashes); None when the parent is another
    launcher (torchrun, srun, a shell)."""
    if parent_cmdline is None:
        try:
            raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
        except OSError:
            return None
        parent_cmdline = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
    head = [Path(a).name for a in parent_cmdline[:3]]
    if "accelerate.commands.launch" in head:  # python -m accelerate.commands.launch ...
        start = head.index("accelerate.commands.launch") + 1
    elif "accelerate" in head and "launch" in parent_cmdline:  # accelerate launch ...
        start = parent_cmdline.index("launch") + 1
    else:
        return None
    args = parent_cmdline[start:]
    args = args[: args.index("-m")] if "-m" in args else args  # the launcher's own flags only
    flags: dict[str, str] = {}
    for i, arg in enumerate(args):
        name, eq, value = arg.partition("=")
        if name in ("--num_processes", "--config_file", "--mixed_precision") and (eq or i + 1 < len(args)):
            flags[name.lstrip("-")] = value if eq else args[i + 1]
    settings: dict = {}
    if "config_file" in flags:
        try:
            loaded = yaml.safe_load(Path(flags["config_file"]).read_text()) or {}
            settings = loaded if isinstance(loaded, dict) else {}
        except (OSError, yaml.YAMLError):
            settings = {}
    return settings | flags


def requested_processes(parent_cmdline: list[str] | None = None) -> int | None:
    """How many processes `accelerate launch` was asked for, when it started this process; None when the
    parent is another launcher."""
    settings = launcher_settings(parent_cmdline)
    if settings is None or ("num_processes" not in settings and "config_file" not in settings):
        return None
    value = str(settings.get("num_processes") or 1)
    return int(value) if value.isdigit() else None


def requested_precision(parent_cmdline: list[str] | None = None) -> str | None:
    """The mixed precision `accelerate launch` was asked for (--mixed_precision, or its config file's
    mixed_precision), in accelerate's names (no, bf16, fp16); None when it was not asked for one."""
    settings = launcher_settings(parent_cmdline)
    value = (settings or {}).get("mixed_precision")
    return str(value) if value not in (None, "") else None


def check_launch(world: int) -> None:
    """Refuse a launch that silently runs fewer processes than asked: `accelerate launch --cpu
    --num_processes N` without mpirun starts ONE process and would train alone without a word."""
    asked = requested_processes()
    if asked is not None and asked > 1 and world == 1:
        raise ConfigError(
            f"accelerate launch asked for {asked} processes but started 1 (its --cpu launcher needs "
            "mpirun); launch with --config_file configs/accelerate/cpu.yaml on CPUs (or "
            f"--multi_gpu --num_processes {asked}), or torchrun --nproc_per_node {asked}"
        )


def check_precision(tcfg: TrainConfig, asked: str | None) -> None:
    """The precision is the config's alone (methods.<m>.precision): a launcher that asks for another one
    is refused rather than silently ignored, so the run is never taken for a bf16 run that was not."""
    if asked is not None and asked != PRECISION[tcfg.precision]:
        wanted = {v: k for k, v in PRECISION.items()}.get(asked, asked)
        raise ConfigError(
            f"accelerate launch asks for mixed precision {asked!r}, but the config trains in {tcfg.precision} "
            f"(methods.<m>.precision, the one precision setting); set methods.<m>.precision: {wanted} (or --set "
            "it) and launch without --mixed_precision"
        )


def _build(tcfg: TrainConfig, log_with: list[str] | None = None) -> Accelerator:
    check_launch(int(os.environ.get("WORLD_SIZE", 1)))
    check_precision(tcfg, requested_precision())
    kwargs: dict = {
        "cpu": not torch.cuda.is_available(),
        "mixed_precision": PRECISION[tcfg.precision],
        "log_with": log_with or None,
    }
    if tcfg.distributed == "zero2":
        from accelerate.utils import DeepSpeedPlugin

        world = int(os.environ.get("WORLD_SIZE", 1))  # set by torchrun / accelerate launch / the SLURM launcher
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=deepspeed_config(tcfg, world))
        # accelerate only starts DeepSpeed's process group when this is set before its state exists, and
        # drops DeepSpeed when cpu=True; on a CPU machine DeepSpeed brings its own CPU accelerator (gloo)
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        kwargs["cpu"] = False
        if "LOCAL_RANK" not in os.environ:  # no launcher: a group of one here, or DeepSpeed looks for MPI
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
        if not torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
            from accelerate.state import PartialState

            PartialState(cpu=False, backend="gloo")  # with no backend accelerate would treat it as 1 process
    return Accelerator(**kwargs)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def uses_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.state.deepspeed_plugin is not None


def any_rank(device: torch.device, *flags: bool | torch.Tensor) -> tuple[bool, ...]:
    """Each flag, true on every rank if it is true on any rank: one all-reduce for all of them (ranks
    that must stop together, e.g. at a non-finite loss or a stop signal, decide together)."""
    values = torch.stack([torch.as_tensor(f, dtype=torch.float32).reshape(()).to(device) for f in flags])
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return tuple(bool(v) for v in values.tolist())


@contextlib.contextmanager
def main_process_lock(accelerator: Accelerator, directory: str | Path, what: str = "run directory"):
    """Rank 0 holds the one-writer lock of `directory` (clipit.locks) for the block; the other ranks do not
    lock. If rank 0 cannot take it, every rank raises LockError (none is left waiting at a collective)."""
    with contextlib.ExitStack() as held:
        error = None
        if accelerator.is_main_process:
            try:
                held.enter_context(exclusive(directory, what))
            except LockError as err:
                error = err
        raise_together(
            accelerator, error, LockError(f"{directory}: rank 0 could not lock this {what} (see its error line)")
        )
        yield


def raise_together(accelerator: Accelerator, error: Exception | None, elsewhere: Exception) -> None:
    """Raise on every rank when any rank met an error (its own, or `elsewhere` on the ranks that did not):
    a check run by one rank must not leave the others waiting at the next collective."""
    (failed,) = (
        any_rank(accelerator.device, error is not None) if accelerator.num_processes > 1 else (error is not None,)
    )
    if failed:
        raise error or elsewhere


def leave_process_group(succeeded: bool = True) -> bool:
    """End a distributed command cleanly: all ranks meet, the process group is destroyed, and what still
    holds its gloo pairs (accelerate's state, the DDP reducer or DeepSpeed engine in a garbage cycle) is
    freed now, while the interpreter is whole; returns whether there was a group. Left to interpreter
    teardown, their threads could abort a rank after its work ("terminate called without an active
    exception", about 1 run in 20 on CPU). A rank that failed skips the barrier (its peers may be stuck
    elsewhere) and only destroys the group."""
    import gc

    import torch.distributed as dist
    from accelerate.state import AcceleratorState

    if not (dist.is_available() and dist.is_initialized()):
        return False
    if succeeded:
        dist.barrier()
    dist.destroy_process_group()
    AcceleratorState._reset_state(reset_partial_state=True)
    gc.collect()
    return True
