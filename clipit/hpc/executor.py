"""submitit executors from a cluster profile, array sizes under MaxArraySize, and waiting for jobs:
shared by grid submission (clipit/hpc/submit.py) and the pairing/shard arrays (clipit/hpc/prepare.py)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from clipit.cells import ERROR_PREFIX
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
        # SLURM: one folder per job (`%j`, filled in by sbatch). The local executor's job process makes
        # the folder it is given as written (a literal `%j/`), and its log names carry the job id anyway.
        folder=folder / "%j" if cluster == "slurm" else folder,
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


PROGRESS_EVERY_S = 60.0  # --wait: one progress line this often


def job_error_line(job, err: BaseException) -> str:
    """Why a job failed, in one line: the last `clipit: error:` line its log holds (what the task wrote
    on stderr), else the exception's own last line (a traceback's, or submitit's 'no result, state X')."""
    try:
        with open(job.paths.stdout, "rb") as log:
            log.seek(0, 2)
            log.seek(max(0, log.tell() - 65536))
            tail = log.read().decode("utf-8", "replace")
    except OSError:
        tail = ""
    quoted = [line.strip() for line in tail.splitlines() if line.startswith(ERROR_PREFIX)]
    if quoted:
        return quoted[-1][len(ERROR_PREFIX) :].strip()
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in lines:
        if line.startswith("has not produced any output"):  # submitit: cancelled, killed or a lost node
            return "no result (" + line.removeprefix("has not produced any output").strip(" ()") + ")"
    # submitit's FailedJobError: the trace between dashed lines, then where the logs are
    trace = [line for line in lines if not line.startswith(("---", "You can check", "- "))]
    return trace[-1] if trace else repr(err)


def wait_for_jobs(
    jobs, out=print, progress: Callable[[], str] | None = None, every: float | None = None, clock=time.monotonic
) -> int:
    """Block until every job ends, printing a progress line every `every` seconds (and at the start and the
    end); then one line per failed job quoting its error line. Returns how many failed."""
    every = PROGRESS_EVERY_S if every is None else every
    progress = progress or (lambda: job_counts(jobs))
    out(f"waiting: {progress()}")
    last = clock()
    while not all(job.done() for job in jobs):
        time.sleep(min(1.0, every))
        if clock() - last >= every:
            out(f"[{time.strftime('%H:%M:%S')}] {progress()}")
            last = clock()
    out(f"finished: {progress()}")
    failures = 0
    for job in jobs:
        try:
            job.results()
        except Exception as err:
            failures += 1
            out(f"FAILED job {job.job_id}: {job_error_line(job, err)} (log: {job.paths.stdout})")
    return failures


def job_counts(jobs) -> str:
    """'N of M jobs finished' for jobs without a ledger (the prepare arrays)."""
    done = sum(job.done() for job in jobs)
    return f"{done} of {len(jobs)} job(s) finished"
