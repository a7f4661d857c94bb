"""submitit executors from a cluster profile, array sizes under MaxArraySize, and waiting for jobs:
shared by grid submission (clipit/hpc/submit.py) and the pairing/shard arrays (clipit/hpc/prepare.py)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from clipit.hpc.cluster import ClusterProfile

DEFAULT_MAX_ARRAY_SIZE = 1000  # SLURM's default MaxArraySize is 1001 (indices 0..1000)


def cluster_max_array_size() -> int | None:
    """MaxArraySize of the cluster (scontrol show config), or None without SLURM."""
    if shutil.which("scontrol") is None:
        return None
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"^MaxArraySize\s*=\s*(\d+)", out, re.M)
    return int(match.group(1)) if match else None


def array_chunk_size(profile: ClusterProfile, cluster_value: int | None) -> int:
    """Tasks per array: the profile's cap, never above the cluster's MaxArraySize."""
    limits = [v for v in (profile.max_array_size or None, cluster_value) if v]
    return min(limits) if limits else DEFAULT_MAX_ARRAY_SIZE


# prints the environment as POSIX `export` lines: what the profile's setup left, carried into the job's sh
_EXPORT_ENV = (
    "import os, shlex; print('\\n'.join(f'export {k}={shlex.quote(v)}' for k, v in os.environ.items() "
    "if k.isidentifier()))"
)


def bash_setup(lines: list[str]) -> list[str]:
    """The profile's setup lines for submitit's local executor, which joins them into its job command under
    /bin/sh (where `source .venv/bin/activate` fails: "source: not found"): they run under bash, as in a
    SLURM job script, and the environment they leave (PATH, VIRTUAL_ENV, module settings) is exported into
    the job. A failing line fails the job."""
    script = "set -e\n" + "\n".join(lines) + "\n" + shlex.join([sys.executable, "-c", _EXPORT_ENV])
    return [f'__clipit_env="$(bash -c {shlex.quote(script)})"', 'eval "$__clipit_env"']


def make_executor(profile: ClusterProfile, folder: Path, name: str, cluster: str, dependency: str | None = None):
    import submitit

    executor = submitit.AutoExecutor(
        folder=folder / "%j",
        cluster=cluster,
        slurm_max_num_timeout=profile.max_num_timeout,
        local_max_num_timeout=profile.max_num_timeout,
        **({"slurm_python": profile.python, "local_python": profile.python} if profile.python else {}),
    )
    params = dict(
        name=name,
        timeout_min=profile.timeout_min,
        nodes=profile.nodes,
        tasks_per_node=profile.tasks_per_node,
        cpus_per_task=profile.cpus_per_task,
        mem_gb=float(profile.mem_gb),
        stderr_to_stdout=True,
    )
    if profile.gpus_per_node:
        params["gpus_per_node"] = profile.gpus_per_node
    if cluster == "slurm":
        params |= {"slurm_array_parallelism": profile.array_parallelism, "slurm_signal_delay_s": profile.signal_delay_s}
        for key in ("partition", "account", "qos", "constraint"):
            if getattr(profile, key):
                params[f"slurm_{key}"] = getattr(profile, key)
        if profile.setup:
            params["slurm_setup"] = list(profile.setup)
        additional = dict(profile.additional)
        if dependency:
            # afterok: start once the tasks that train the warm starts succeeded; if one fails the
            # dependency can never be met, and SLURM cancels these tasks instead of keeping them queued
            # (the ledger then shows them as lost, and a rerun resubmits them).
            params["slurm_dependency"] = dependency
            additional.setdefault("kill_on_invalid_dep", "yes")
        if additional:
            params["slurm_additional_parameters"] = additional
    elif cluster == "local" and profile.setup:
        params["local_setup"] = bash_setup(profile.setup)
    executor.update_parameters(**params)
    return executor


def wait_for_jobs(jobs, out=print) -> int:
    """Block until every job ends; print one line per failed job and return how many failed."""
    failures = 0
    for job in jobs:
        try:
            job.results()
        except Exception as err:
            failures += 1
            lines = str(err).strip().splitlines()
            out(f"FAILED job {job.job_id}: {lines[-1] if lines else repr(err)} (log: {job.paths.stdout})")
    return failures
