"""Resume faults: a damaged, foreign or incomplete resume checkpoint stops `clipit train` with one line
naming the file and `--resume none`, never a silent restart or an inexact resume; no load path runs
code from a file (a pickle payload is refused without running); TensorBoard keeps one event per step
after a kill -9 and a resume; DeepSpeed resumes exactly through the same data-only format.

Every CLI case builds real artifacts (a checkpointed run of the tiny demo), damages a copy, runs the
real CLI and checks the contract: exit 2, one `clipit: error:` line (the last), no traceback, and no
output a later stage would accept."""

import json
import os
import pickle
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import clipit_testing
from clipit_testing import RESUME_CELL, ROOT, TORCHRUN_2, cli, start_frozen_after, train_args, wait_stopped

CELL = RESUME_CELL  # CLIP-IT standing alone: 12 steps, resume checkpoints every 2 (the last at 10)
OUTPUTS = ("train_summary.json", "metrics.json", "predictions-test.npz", "best.safetensors", "best.json")


def run_dir(out: Path, method: str = "clipit") -> Path:
    return out / "runs" / method / "seed-0"


def assert_refused(proc, run: Path, *needles: str, absent=OUTPUTS) -> str:
    return clipit_testing.assert_refused(proc, run, *needles, absent=absent)


@pytest.fixture(scope="module")
def checkpointed(resume_cell):
    """The session's finished 12-step cell and its test metrics; its checkpoints/latest (step 10) stays
    behind. Shared: tests work on copies (interrupted)."""
    assert json.loads((run_dir(resume_cell) / "checkpoints" / "latest" / "progress.json").read_text())["step"] == 10
    return resume_cell, json.loads((run_dir(resume_cell) / "metrics.json").read_text())


@pytest.fixture
def interrupted(checkpointed, tmp_path):
    """A copy of the cell as a kill after step 10 leaves it: resume state, no outputs."""
    out = tmp_path / "out"
    shutil.copytree(checkpointed[0], out)
    for name in OUTPUTS:
        (run_dir(out) / name).unlink()
    return out, run_dir(out), run_dir(out) / "checkpoints" / "latest"


def rehash(latest: Path, name: str) -> None:
    """Record the current sha256 of `name` in progress.json (a file replaced *with* a matching manifest)."""
    import hashlib

    progress = json.loads((latest / "progress.json").read_text())
    progress["files"][name] = hashlib.sha256((latest / name).read_bytes()).hexdigest()
    (latest / "progress.json").write_text(json.dumps(progress))


def resume(out: Path, shards, *extra: str):
    return cli(*train_args(out, shards, *CELL, *extra))


# ---------------------------------------------------------------------------------------------- exact resume


def test_intact_checkpoint_resumes_to_the_same_result(checkpointed, interrupted, tiny_shards):
    out, run, _ = interrupted
    proc = resume(out, tiny_shards)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((run / "train_summary.json").read_text())["resumed_from_step"] == 10
    got, want = json.loads((run / "metrics.json").read_text()), checkpointed[1]
    assert (got["balanced_accuracy"], got["loss"]) == (want["balanced_accuracy"], want["loss"])
    names = sorted(p.name for p in (run / "checkpoints" / "latest").iterdir())
    assert names == [
        "optimizer.safetensors",
        "progress.json",
        "rng-0.safetensors",
        "scheduler.safetensors",
        "trainable.safetensors",
    ]  # data only: no .pt files


# ---------------------------------------------------------------------------------------------- damaged files


@pytest.mark.slow  # the default tier keeps its siblings; CI runs this tier too
def test_truncated_tensor_file_is_refused(interrupted, tiny_shards):
    out, run, latest = interrupted
    data = (latest / "trainable.safetensors").read_bytes()
    (latest / "trainable.safetensors").write_bytes(data[: len(data) // 2])
    assert_refused(resume(out, tiny_shards), run, "trainable.safetensors", "--resume none")


def test_flipped_byte_in_optimizer_state_is_refused(interrupted, tiny_shards):
    out, run, latest = interrupted
    data = bytearray((latest / "optimizer.safetensors").read_bytes())
    data[-3] ^= 0x40  # same size, still a valid safetensors file: only the checksum can tell
    (latest / "optimizer.safetensors").write_bytes(bytes(data))
    assert_refused(resume(out, tiny_shards), run, "optimizer.safetensors", "sha256", "--resume none")


def test_garbage_progress_json_is_refused(interrupted, tiny_shards):
    out, run, latest = interrupted
    (latest / "progress.json").write_text('{"step": 10, "best_')
    assert_refused(resume(out, tiny_shards), run, "progress.json", "unreadable", "--resume none")


@pytest.mark.slow  # the default tier keeps its siblings; CI runs this tier too
def test_garbage_state_file_with_a_matching_checksum_is_refused(interrupted, tiny_shards):
    out, run, latest = interrupted
    (latest / "scheduler.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    rehash(latest, "scheduler.safetensors")
    assert_refused(resume(out, tiny_shards), run, "scheduler.safetensors", "--resume none")


@pytest.mark.slow  # the default tier keeps its siblings; CI runs this tier too
def test_missing_rank_file_is_refused(interrupted, tiny_shards):
    out, run, latest = interrupted
    (latest / "rng-0.safetensors").unlink()
    assert_refused(resume(out, tiny_shards), run, "rng-0.safetensors", "missing", "--resume none")


@pytest.mark.slow  # the default tier keeps its siblings; CI runs this tier too
def test_latest_without_its_marker_is_refused(interrupted, tiny_shards):
    out, run, latest = interrupted
    (latest / "progress.json").unlink()
    assert_refused(resume(out, tiny_shards), run, "progress.json", "missing although", "--resume none")


@pytest.mark.slow  # the default tier keeps its siblings; CI runs this tier too
def test_interrupted_swap_is_refused_not_restarted(interrupted, tiny_shards):
    """Killed between replace_dir's two renames: latest/ is gone, the new checkpoint sits in its temporary
    folder. Treating that as "no checkpoint" would silently start over."""
    out, run, latest = interrupted
    shutil.copytree(latest, latest.parent / ".latest.tmp-10")
    os.replace(latest, latest.parent / ".latest.old")
    assert_refused(resume(out, tiny_shards), run, ".latest.tmp-10", "rename", "--resume none")


@pytest.mark.slow  # the default tier keeps its siblings; CI runs this tier too
def test_checkpoint_of_an_older_clipit_is_refused(interrupted, tiny_shards):
    out, run, latest = interrupted
    progress = json.loads((latest / "progress.json").read_text())
    del progress["format"]
    (latest / "progress.json").write_text(json.dumps(progress))
    assert_refused(resume(out, tiny_shards), run, "progress.json", "older clipit", "--resume none")


# ---------------------------------------------------------------------------------------------- another config


@pytest.mark.parametrize(
    "change, key",
    [("methods.clipit.lr=0.002", "methods.clipit.lr"), ("model.lora.r=4", "model.lora.r")],
    ids=["lr", "lora-rank"],
)
def test_checkpoint_of_another_config_is_refused(interrupted, tiny_shards, change, key):
    out, run, _ = interrupted
    line = assert_refused(
        resume(out, tiny_shards, change), run, "progress.json", "another config", key, "--resume none"
    )
    assert "then" in line and "now" in line


@pytest.mark.slow  # the default tier keeps its siblings; CI runs this tier too
def test_resume_none_starts_over(interrupted, tiny_shards):
    """The advice works: the damaged checkpoint is dropped and the cell trains from step 0."""
    out, run, latest = interrupted
    (latest / "progress.json").write_text("garbage")
    proc = cli(*train_args(out, tiny_shards, *CELL), "--resume", "none")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((run / "train_summary.json").read_text())["resumed_from_step"] is None


def test_empty_or_absent_latest_is_no_checkpoint(tmp_path):
    from clipit.training.state import load_training_state

    run = tmp_path / "run"
    assert load_training_state(run, None, None, None, None, None) is None  # absent
    (run / "checkpoints" / "latest").mkdir(parents=True)
    assert load_training_state(run, None, None, None, None, None) is None  # empty


# ---------------------------------------------------------------------------------------------- no code from data


class Payload:
    """Unpickling this creates `marker`: what a malicious checkpoint would do (with worse code)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def payload(tmp_path):
    """(raw pickle bytes, torch.save bytes, marker). Both really run when fully unpickled."""
    marker = tmp_path / "PAYLOAD-RAN"
    raw = pickle.dumps({"weight": Payload(marker)})
    pickle.loads(raw).get("weight").close()
    assert marker.exists()
    marker.unlink()
    torch.save({"state_dict": {"weight": Payload(marker)}}, tmp_path / "probe.pt")
    torch.load(tmp_path / "probe.pt", weights_only=False)["state_dict"]["weight"].close()
    assert marker.exists()
    marker.unlink()
    return raw, (tmp_path / "probe.pt").read_bytes(), marker


def test_pickle_payload_in_resume_state_is_refused(interrupted, tiny_shards, payload):
    out, run, latest = interrupted
    raw, torch_bytes, marker = payload
    (latest / "optimizer.safetensors").write_bytes(torch_bytes)
    rehash(latest, "optimizer.safetensors")  # the checksum passes: only the format can refuse it
    assert_refused(resume(out, tiny_shards), run, "optimizer.safetensors", "--resume none")
    assert not marker.exists()


@pytest.mark.parametrize(
    "path",
    ["backbone-pt", "backbone-bin", "backbone-safetensors", "warm-start", "export", "resume-state", "deepspeed-engine"],
)
def test_pickle_payload_is_refused_on_every_load_path(tmp_path, payload, monkeypatch, path):
    from clipit.errors import ClipitError

    monkeypatch.setenv("CLIPIT_OFFLINE", "1")
    raw, torch_bytes, marker = payload
    if path.startswith("backbone"):
        from clipit.models.backbones import BackboneError, build_backbone

        suffix = {"backbone-pt": ".pt", "backbone-bin": ".bin", "backbone-safetensors": ".safetensors"}[path]
        file = tmp_path / f"weights{suffix}"
        file.write_bytes(raw if suffix == ".safetensors" else torch_bytes)
        with pytest.raises(BackboneError, match="weights"):
            build_backbone("kaiko-vits16-tiny", weights=str(file))
    elif path == "warm-start":
        from clipit.models.backbones import build_backbone
        from clipit.models.checkpoint import CheckpointError, load_model_state
        from clipit.models.clipit import VisionClassifier

        (tmp_path / "best.safetensors").write_bytes(raw)
        (tmp_path / "best.json").write_text(json.dumps({"method": "unimodal"}))
        model = VisionClassifier(build_backbone("kaiko-vits16-tiny")[0], 4)
        with pytest.raises(CheckpointError, match="best.safetensors: not a readable safetensors file"):
            load_model_state(tmp_path / "best", model)
    elif path == "export":
        from clipit.evaluation.export import ExportError, load_exported

        (tmp_path / "model.safetensors").write_bytes(raw)
        (tmp_path / "config.json").write_text(
            json.dumps(
                {
                    "format": "clipit-export",
                    "version": 1,
                    "backbone": "kaiko-vits16-tiny",
                    "model_image_size": None,
                    "method": "unimodal",
                    "classes": ["a", "b"],
                    "text_dim": 16,
                    "kd_layers": 1,
                    "input_size": 64,
                    "mean": [0.5] * 3,
                    "std": [0.5] * 3,
                }
            )
        )
        with pytest.raises(ExportError, match="model.safetensors: not a readable safetensors file"):
            load_exported(tmp_path)
    elif path == "resume-state":
        from clipit.training.state_files import BadStateFile, load_tree

        for data in (raw, torch_bytes):
            (tmp_path / "optimizer.safetensors").write_bytes(data)
            with pytest.raises(BadStateFile, match="optimizer.safetensors: not a readable clipit state file"):
                load_tree(tmp_path / "optimizer.safetensors")
    else:  # what DeepSpeed's own load_checkpoint reads through (mp_rank_*_model_states.pt, zero_pp_rank_*)
        pytest.importorskip("deepspeed")
        from clipit.training.state_files import BadStateFile, _safe_engine_class

        (tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(torch_bytes)
        with pytest.raises((BadStateFile, ClipitError), match="not a readable clipit state file"):
            _safe_engine_class()().load(str(tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"), "cpu")
    assert not marker.exists()


def test_torch_hub_needs_an_explicit_opt_in(monkeypatch, tmp_path):
    """torch.hub runs the repository's hubconf.py: without CLIPIT_TRUST_HUB=1 it is never called."""
    from clipit.models.backbones import BackboneError, build_backbone, fetch_hub_state, get_spec

    calls = []
    tiny, _ = build_backbone("kaiko-vits16-tiny")
    monkeypatch.setattr(torch.hub, "load", lambda *a, **k: calls.append(a) or tiny)
    monkeypatch.delenv("CLIPIT_TRUST_HUB", raising=False)
    monkeypatch.delenv("CLIPIT_OFFLINE", raising=False)
    monkeypatch.delenv("CLIPIT_WEIGHTS", raising=False)
    with pytest.raises(BackboneError) as err:
        build_backbone("kaiko-vits16")
    message = str(err.value)
    assert "CLIPIT_TRUST_HUB=1" in message and "weights file" in message and "\n" not in message
    assert calls == []
    monkeypatch.setenv("CLIPIT_TRUST_HUB", "1")
    fetch_hub_state(get_spec("kaiko-vits16"), get_spec("kaiko-vits16").hub_id)
    assert calls == [("kaiko-ai/towards_large_pathology_fms", "vits16")]


def test_no_code_loading_calls_in_the_package():
    """No full unpickling anywhere in clipit: every torch.load is weights_only=True, nothing torch.saves."""
    found = subprocess.run(
        ["grep", "-rn", "--include=*.py", r"weights_only=False\|pickle\.load\|torch\.save(", str(ROOT / "clipit")],
        capture_output=True,
        text=True,
    ).stdout
    assert found == "", found
    loads = subprocess.run(
        ["grep", "-rn", "--include=*.py", r"torch\.load(", str(ROOT / "clipit")], capture_output=True, text=True
    ).stdout.splitlines()
    assert loads and all("weights_only=True" in line for line in loads), loads


# ---------------------------------------------------------------------------------------------- TensorBoard


def _events(tb: Path) -> dict[str, list[int]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _raw_steps(tb: Path) -> list[int]:
    """Scalar steps as written, before TensorBoard's purge (every event file, in order)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    steps = []
    for file in sorted(tb.glob("events.out.tfevents.*")):
        try:  # a file being written may end in a partial record: what is whole counts
            steps += [
                e.step
                for e in EventFileLoader(str(file)).Load()
                if e.HasField("summary") and any(v.tag == "val/loss" for v in e.summary.value)
            ]
        except Exception:
            pass
    return steps


def _checkpoint_step(run: Path) -> int:
    try:
        return json.loads((run / "checkpoints" / "latest" / "progress.json").read_text())["step"]
    except (OSError, ValueError):
        return 0


@pytest.mark.slow
def test_tensorboard_has_one_event_per_step_after_kill_9_and_resume(tiny_shards, tmp_path):
    """kill -9 while events past the last checkpoint are on disk (validation flushes them), then resume:
    TensorBoard (purge_step) drops the killed attempt's later events, so every step appears once.

    The kill is made exact with SIGSTOP: the process freezes itself after its third validation (step 6,
    past checkpoint 4), so the condition (events past the checkpoint on disk) is checked on a frozen
    state before SIGKILL."""
    cell = CELL[:2] + ["methods.clipit.checkpoint_every=4", "methods.clipit.evals_per_epoch=2"]  # val every 2 steps
    run, tb = run_dir(tmp_path), tmp_path / "tb" / "clipit" / "seed-0"
    # frozen after its 3rd validation (step 6): checkpoint 4 is the latest, step 6's events are flushed
    proc = start_frozen_after(
        "clipit.training.training_run:TrainingRun.validate",
        3,
        *train_args(tmp_path, tiny_shards, *cell),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    killed = False
    try:
        wait_stopped(proc, 300, "its third validation")
        if max(_raw_steps(tb), default=0) > _checkpoint_step(run):
            os.kill(proc.pid, signal.SIGKILL)
            killed = True
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
    assert killed, "no events past the checkpoint were on disk when the run froze"
    ckpt = _checkpoint_step(run)
    assert max(_raw_steps(tb)) > ckpt  # the killed attempt did write events past its checkpoint
    assert not (run / "train_summary.json").exists()
    done = cli(*train_args(tmp_path, tiny_shards, *cell))
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((run / "train_summary.json").read_text())["resumed_from_step"] == ckpt
    raw = _raw_steps(tb)
    assert len(raw) > len(set(raw))  # both attempts wrote the steps after the checkpoint ...
    events = _events(tb)
    assert events["val/loss"] == [2, 4, 6, 8, 10, 12]  # ... and TensorBoard shows each once, in order
    assert events["train/loss"] == [10, 12]
    for tag, steps in events.items():
        assert steps == sorted(set(steps)), (tag, steps)


# ---------------------------------------------------------------------------------------------- DeepSpeed


def _torchrun(out: Path, shards, *extra: str):
    cmd = [
        *TORCHRUN_2,
        *train_args(
            out,
            shards,
            "methods.unimodal.epochs=3",
            "methods.unimodal.checkpoint_every=2",
            "methods.unimodal.batch_size=32",
            "methods.unimodal.distributed=zero2",
            *extra,
            method="unimodal",
        ),
    ]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.multiproc
def test_zero2_resumes_exactly_and_refuses_code_in_its_files(tiny_shards, tmp_path, payload):
    """ZeRO-2 on 2 ranks: DeepSpeed's checkpoint goes through the data-only engine (no .pt pickles), a
    resume from step 10 ends exactly where the uninterrupted run did, and a pickle payload in a
    partition file is refused on every rank without running."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "zero2"
    proc = _torchrun(out, tiny_shards)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = run_dir(out, "unimodal")
    with np.load(run / "predictions-test.npz") as pred:
        want = pred["logits"]
    latest = run / "checkpoints" / "latest"
    state = latest / "deepspeed" / "state"
    parts = sorted(p.name for p in state.iterdir())
    assert parts == [
        "mp_rank_00_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    for part in parts:  # DeepSpeed's names, clipit's data-only content
        assert (state / part).read_bytes()[8:9] == b"{", part
    damaged = tmp_path / "damaged"
    shutil.copytree(out, damaged)
    for name in ("train_summary.json", "metrics.json", "predictions-test.npz"):  # as a kill after step 10 leaves it
        (run / name).unlink()
        (run_dir(damaged, "unimodal") / name).unlink()

    proc = _torchrun(out, tiny_shards)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((run / "train_summary.json").read_text())["resumed_from_step"] == 10
    with np.load(run / "predictions-test.npz") as pred:
        np.testing.assert_array_equal(pred["logits"], want)

    raw, torch_bytes, marker = payload
    bad = run_dir(damaged, "unimodal") / "checkpoints" / "latest"
    (bad / "deepspeed" / "state" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(torch_bytes)
    rehash(bad, "deepspeed/state/zero_pp_rank_1_mp_rank_00_optim_states.pt")
    proc = _torchrun(damaged, tiny_shards)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "clipit: error:" in line]
    assert len(errors) == 2 and all(
        "zero_pp_rank_1_mp_rank_00_optim_states.pt" in e and "--resume none" in e for e in errors
    ), proc.stderr[-4000:]
    assert not marker.exists()
    assert not (run_dir(damaged, "unimodal") / "train_summary.json").exists()
