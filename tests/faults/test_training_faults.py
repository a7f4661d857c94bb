"""Training and evaluation faults: nothing silent. A non-finite loss, gradient or validation/test
prediction stops with one line naming the step and the samples (and their shards); a damaged shard
met while training or evaluating is one line naming it; a second writer of a run directory is
refused. Nothing a later stage accepts is left behind (best.*, train_summary.json, metrics.json).

Every case builds real shards of the tiny demo, damages a copy, and runs the real CLI (or, where the
config layer already refuses the input, the library call that bypasses it)."""

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest

import clipit_testing
from clipit_testing import ROOT, TINY, cli, shard_copy, train_args, with_shards, written_key

ALONE = ["methods.clipit.warm_start=null"]  # one CLIP-IT cell that needs no unimodal run
OUTPUTS = ("train_summary.json", "metrics.json", "predictions-test.npz", "best.safetensors", "best.json")


def run_dir(out: Path, method: str = "clipit") -> Path:
    return out / "runs" / method / "seed-0"


def assert_refused(proc, run: Path, *needles: str, absent=OUTPUTS) -> str:
    return clipit_testing.assert_refused(proc, run, *needles, absent=absent)


def rewrite_member(tar_path: Path, member: str, data: bytes) -> None:
    """Replace one member's bytes in a shard, keeping every other member and the order."""
    out = io.BytesIO()
    with tarfile.open(tar_path) as src, tarfile.open(fileobj=out, mode="w") as dst:
        names = src.getnames()
        assert member in names, names[:6]
        for info in src.getmembers():
            content = data if info.name == member else src.extractfile(info).read()
            info.size = len(content)
            dst.addfile(info, io.BytesIO(content))
    tar_path.write_bytes(out.getvalue())


def rehash(shard_dir: Path, *tars: Path) -> None:
    """Record the damaged shards' sha256 in the manifest: the damage is in the data itself, so no
    checksum can tell (as with a source image or embedding that was already bad when sharded)."""
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    for split in manifest["splits"].values():
        for entry in split["shards"]:
            if shard_dir / entry["path"] in tars:
                entry["sha256"] = hashlib.sha256((shard_dir / entry["path"]).read_bytes()).hexdigest()
    (shard_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))


def nan_embedding(shard_dir: Path, split: str, indices: list[int], per_shard: int = 64) -> list[str]:
    """Set the report embedding of the samples at write positions `indices` of `split` to NaN (re-hashed);
    returns their keys."""
    from clipit.shards.codec import encode_embedding

    dim = json.loads((shard_dir / "manifest.json").read_text())["embedding"]["dim"]
    keys, tars = [], []
    for index in indices:
        key = written_key(split, index)
        tar = shard_dir / split / f"{split}-{index // per_shard:06d}.tar"
        rewrite_member(tar, f"{key}.emb.npy", encode_embedding(np.full(dim, np.nan, np.float32)))
        keys.append(key)
        tars.append(tar)
    rehash(shard_dir, *tars)
    return keys


def corrupt_image(shard_dir: Path, split: str, indices: list[int], per_shard: int = 64) -> list[Path]:
    """Garble the image of the samples at write positions `indices`, whichever codec stores it (a PNG that does not decode, raw
    pixels cut short); the manifest is untouched: a shard damaged on disk."""
    from clipit.shards.codec import IMAGE_FIELDS

    tars = []
    for index in indices:
        tar = shard_dir / split / f"{split}-{index // per_shard:06d}.tar"
        key = written_key(split, index)
        with tarfile.open(tar) as src:
            member = next(n for n in src.getnames() if n.startswith(key + ".") and n[len(key) + 1 :] in IMAGE_FIELDS)
        rewrite_member(tar, member, b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
        tars.append(tar)
    return tars


TRAIN_FIRSTS = [0, 64, 128, 192]  # the first sample of each of the 4 train shards: the first batches meet one


# ---------------------------------------------------------------------------------------------- non-finite


def test_nan_report_embedding_stops_training_naming_step_and_sample(tiny_shards, tmp_path):
    shards = shard_copy(tiny_shards, tmp_path)
    keys = nan_embedding(shards, "train", TRAIN_FIRSTS)
    proc = cli(*train_args(tmp_path, with_shards(tiny_shards, shards), *ALONE))
    line = assert_refused(
        proc, run_dir(tmp_path), "training step ", "non-finite report embeddings", "clipit shard validate"
    )
    assert any(k in line for k in keys) and "train-00000" in line and ".tar" in line, line


def test_huge_learning_rate_stops_at_the_first_non_finite_step(tiny_shards, tmp_path):
    """lr 1e30: the first update puts LoRA A and B near 1e30, so the next forward overflows."""
    proc = cli(*train_args(tmp_path, tiny_shards, *ALONE, "methods.clipit.lr=1e30"))
    line = assert_refused(proc, run_dir(tmp_path), "training step ", "not finite", "methods.clipit.lr", "--resume none")
    assert "training step 1 " not in line  # step 1 itself is finite: its update is what overflows


def test_lam_nan_on_the_command_line_is_one_line(tiny_shards, tmp_path):
    proc = cli(*train_args(tmp_path, tiny_shards, *ALONE, "methods.clipit.lam=.nan"))
    assert_refused(proc, run_dir(tmp_path), "methods.clipit.lam")


def test_fit_stops_a_nan_producing_model_that_bypassed_the_config(tiny_shards, tmp_path):
    """A library caller can build a config the loader would refuse (lam = NaN): the trainer still stops."""
    from clipit.config import load_config
    from clipit.training.predict import NonFiniteError
    from clipit.training.trainer import fit

    cfg = load_config(ROOT / TINY, [f"output_dir={tmp_path}", *tiny_shards, *ALONE])
    cfg.methods["clipit"].lam = float("nan")
    run = run_dir(tmp_path)
    with pytest.raises(NonFiniteError, match=r"training step 1 of clipit seed 0: the loss is not finite") as err:
        fit(cfg, "clipit", 0, run)
    assert "\n" not in str(err.value)
    for name in OUTPUTS:
        assert not (run / name).exists(), name


def test_nan_in_validation_stops_before_any_best_checkpoint(tiny_shards, tmp_path):
    shards = shard_copy(tiny_shards, tmp_path)
    keys = nan_embedding(shards, "val", [5])
    proc = cli(*train_args(tmp_path, with_shards(tiny_shards, shards), *ALONE))
    line = assert_refused(
        proc,
        run_dir(tmp_path),
        "validation at step 2 of clipit seed 0",
        keys[0],
        "val-000000.tar",
        "clipit shard validate",
    )
    assert "nan" in line


# ---------------------------------------------------------------------------------------------- damaged shards


def test_corrupt_image_met_in_training_names_the_shard(tiny_shards, tmp_path):
    shards = shard_copy(tiny_shards, tmp_path)
    corrupt_image(shards, "train", TRAIN_FIRSTS)
    # caught before the first step: the once-per-run check of the set against its manifest
    proc = cli(*train_args(tmp_path, with_shards(tiny_shards, shards), *ALONE))
    line = assert_refused(proc, run_dir(tmp_path), "train-00000", ".tar")
    assert "checksum" in line and "clipit shard build" in line
    # behind a re-hashed manifest the loader meets it: the line names the shard and the sample
    rehash(shards, *sorted((shards / "train").glob("*.tar")))
    proc = cli(*train_args(tmp_path, with_shards(tiny_shards, shards), *ALONE))
    line = assert_refused(proc, run_dir(tmp_path), "train-00000", ".tar")
    assert "train_000" in line


def test_truncated_train_shard_names_the_shard(tiny_shards, tmp_path):
    shards = shard_copy(tiny_shards, tmp_path)
    for tar in sorted((shards / "train").glob("*.tar")):
        os.truncate(tar, tar.stat().st_size // 2 + 100)  # mid-member: a cut copy
    proc = cli(*train_args(tmp_path, with_shards(tiny_shards, shards), *ALONE))
    assert_refused(proc, run_dir(tmp_path), "train-00000", ".tar")


@pytest.fixture(scope="module")
def trained(tiny_shards, tmp_path_factory):
    """A trained and evaluated CLIP-IT cell (4 steps)."""
    out = tmp_path_factory.mktemp("trained")
    proc = cli(*train_args(out, tiny_shards, *ALONE))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture
def unevaluated(trained, tmp_path):
    """A copy of the trained cell without its evaluation outputs."""
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    for name in ("metrics.json", "predictions-test.npz"):
        (run_dir(out) / name).unlink()
    return out


def evaluate(out: Path, overrides: list[str]):
    sets = [f"output_dir={out}", *overrides, *ALONE]
    return cli(
        "evaluate", "--config", TINY, "--method", "clipit", "--seed", "0", *[a for s in sets for a in ("--set", s)]
    )


EVAL_OUTPUTS = ("metrics.json", "predictions-test.npz")


def test_nan_in_the_test_split_stops_evaluation(unevaluated, tiny_shards, tmp_path):
    shards = shard_copy(tiny_shards, tmp_path)
    keys = nan_embedding(shards, "test", [70])
    proc = evaluate(unevaluated, with_shards(tiny_shards, shards))
    assert_refused(
        proc, run_dir(unevaluated), "evaluation of", "on test", keys[0], "test-000001.tar", absent=EVAL_OUTPUTS
    )


def test_corrupt_image_met_in_evaluation_names_the_shard(unevaluated, tiny_shards, tmp_path):
    shards = shard_copy(tiny_shards, tmp_path)
    corrupt_image(shards, "test", [100])
    proc = evaluate(unevaluated, with_shards(tiny_shards, shards))
    assert_refused(proc, run_dir(unevaluated), "test-000001.tar", "test_00000100", absent=EVAL_OUTPUTS)


def test_export_refuses_a_run_that_did_not_finish_training(unevaluated, tmp_path):
    """best.* of a run stopped mid-training (kill, non-finite loss) is not a result: export says so."""
    run = run_dir(unevaluated)
    (run / "train_summary.json").unlink()
    proc = cli("export", str(run), str(tmp_path / "export"))
    assert_refused(proc, run, "train_summary.json", "clipit train", absent=())
    assert not (tmp_path / "export" / "config.json").exists()


# ---------------------------------------------------------------------------------------------- one writer


HOLD = textwrap.dedent("""
    import sys, time
    from clipit.locks import exclusive
    with exclusive(sys.argv[1], "run directory"):
        print("locked", flush=True)
        time.sleep(600)
""")


@pytest.fixture
def locked(request):
    """A real process holding the run-directory lock of the path given by the test's `lock_target`."""
    procs = []

    def hold(directory: Path) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLD, str(directory)], cwd=ROOT, stdout=subprocess.PIPE, text=True
        )
        procs.append(proc)
        assert proc.stdout.readline().strip() == "locked"
        return proc

    yield hold
    for proc in procs:
        proc.kill()
        proc.wait()


def test_second_train_of_the_same_cell_is_refused(tiny_shards, tmp_path):
    """Two real `clipit train` processes on one cell. The first is frozen (SIGSTOP) once it holds the
    lock, so the second meets a live holder whatever the machine's speed."""
    from clipit.locks import LockError, exclusive

    run = run_dir(tmp_path)
    first = subprocess.Popen(
        [sys.executable, "-m", "clipit", *train_args(tmp_path, tiny_shards, *ALONE, "methods.clipit.epochs=20")],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        from clipit.locks import holder
        from clipit_testing import wait_for

        wait_for(
            lambda: (holder(run) or {}).get("pid") == first.pid or first.poll() is not None,
            300,
            "the first training to lock its run directory",
        )
        assert first.poll() is None, "the first training ended before the test could freeze it"
        os.kill(first.pid, signal.SIGSTOP)
        with pytest.raises(LockError):  # the frozen first process really holds the lock
            with exclusive(run, "run directory"):
                pass
        second = cli(*train_args(tmp_path, tiny_shards, *ALONE, "methods.clipit.epochs=20"))
        assert_refused(second, run, str(run), f"pid {first.pid}", "being written by")
    finally:
        first.kill()
        first.wait()


def test_train_is_refused_while_another_process_writes_the_run(tiny_shards, tmp_path, locked):
    run = run_dir(tmp_path)
    holder_proc = locked(run)
    proc = cli(*train_args(tmp_path, tiny_shards, *ALONE))
    assert_refused(proc, run, f"pid {holder_proc.pid}", "being written by")
    assert not (run / "config.yaml").exists() and not (tmp_path / "tb").exists()  # nothing written before the lock


def test_evaluate_is_refused_while_another_process_writes_the_run(unevaluated, tiny_shards, locked):
    run = run_dir(unevaluated)
    holder_proc = locked(run)
    proc = evaluate(unevaluated, tiny_shards)
    assert_refused(proc, run, f"pid {holder_proc.pid}", "being written by", absent=EVAL_OUTPUTS)
