"""Shard builds on compute nodes: byte-identical output, parts of an array, and a SIGKILL mid-build."""

import hashlib
import json
import os
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
from pairing.fakes import make_images, make_reports, pair_with_tiny_model, write_config

from clipit.cli import main
from clipit.config import load_config
from clipit.locks import LOCK_FILE
from clipit.pipeline import build_image_dataset
from clipit.shards.manifest import LOCKS, MANIFEST, PLAN, ShardError
from clipit.shards.validate import validate_shards
from clipit.shards.writer import part_units, shard_units
from clipit_testing import start_frozen_after, wait_stopped


def digests(shard_dir: Path) -> dict[str, str]:
    files = sorted(shard_dir.rglob("*.tar")) + [shard_dir / MANIFEST]
    return {p.relative_to(shard_dir).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def shard(config: Path, shard_dir: Path, *args: str) -> int:
    return main(["shard", "build", "--config", str(config), "--set", f"shards.dir={shard_dir}", *args])


@pytest.fixture()
def setup(tmp_path):
    images = make_images(tmp_path / "images", {"train": 21, "val": 6, "test": 9})
    config = write_config(tmp_path, images, make_reports(tmp_path / "reports.jsonl"))
    pair_with_tiny_model(config)
    return tmp_path, config


def test_rebuild_is_byte_identical_with_fixed_tar_headers(setup, monkeypatch):
    base, config = setup
    assert shard(config, base / "a") == 0
    monkeypatch.setattr(time, "time", lambda: 2_000_000_000.0)  # a later wall clock must not leak into tars
    assert shard(config, base / "b") == 0
    assert digests(base / "a") == digests(base / "b") and len(digests(base / "a")) == 6 + 2 + 3 + 1
    with tarfile.open(base / "a" / "val" / "val-000000.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members[:4]] == [
        "val_00000000.cls",
        "val_00000000.emb.npy",
        "val_00000000.json",
        "val_00000000.png",
    ]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {
        (0, 0, 0, "clipit", "clipit", 0o444)
    }
    assert validate_shards(base / "a") == {"train": 21, "val": 6, "test": 9}


def test_parts_write_disjoint_shards_and_the_last_one_the_manifest(setup, capsys):
    base, config = setup
    assert shard(config, base / "whole") == 0
    out = base / "parts"
    for part in range(3):
        assert not (out / MANIFEST).exists()
        assert shard(config, out, "--part", str(part), "--num-parts", "3") == 0
    assert "still missing" in capsys.readouterr().out
    assert digests(out) == digests(base / "whole")
    # part layouts are round-robin over one fixed order of (split, shard) units
    cfg = load_config(config)
    units = shard_units(build_image_dataset(cfg), 4)
    assert units[:3] == [("train", 0), ("train", 1), ("train", 2)] and len(units) == 11
    assert sorted(u for p in range(4) for u in part_units(units, p, 4)) == sorted(units)
    with pytest.raises(ShardError, match="need 0 <= part < num-parts"):
        part_units(units, 3, 3)


def test_finalize_refuses_missing_shards_and_settings_cannot_change_midway(setup, capsys):
    base, config = setup
    out = base / "shards"
    assert shard(config, out, "--part", "0", "--num-parts", "2") == 0
    assert shard(config, out, "--finalize") == 2
    err = capsys.readouterr().err
    assert "shard(s) missing" in err and "--finalize" in err
    assert (
        main(
            [
                "shard",
                "build",
                "--config",
                str(config),
                "--set",
                f"shards.dir={out}",
                "--set",
                "shards.samples_per_shard=5",
                "--part",
                "1",
                "--num-parts",
                "2",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(
        f"clipit: error: {out / PLAN}: the shards in {out} were built under another config (shards.samples_per_shard: "
    )
    assert shard(config, out, "--part", "1", "--num-parts", "2") == 0
    assert shard(config, out, "--finalize") == 0 and (out / MANIFEST).exists()
    assert shard(config, out, "--part", "5") == 2  # --part without --num-parts


def test_parts_need_pairs_first(tmp_path, capsys):
    images = make_images(tmp_path / "images", {"train": 4, "val": 2, "test": 2})
    config = write_config(tmp_path, images, make_reports(tmp_path / "reports.jsonl"))
    assert shard(config, tmp_path / "shards", "--part", "0", "--num-parts", "2") == 2
    assert "run `clipit pair --config <config>` once before the shard parts" in capsys.readouterr().err


def test_sigkill_midway_then_rerun_is_byte_identical(tmp_path):
    """The real entry point (shards/build.py) in its own process, SIGKILLed once 5 shards exist (it freezes
    itself there, so the kill lands mid-build on any machine)."""
    images = make_images(tmp_path / "images", {"train": 80, "val": 20, "test": 20}, size=32)
    config = write_config(tmp_path, images, make_reports(tmp_path / "reports.jsonl"), shards={"samples_per_shard": 1})
    pair_with_tiny_model(config)
    assert shard(config, tmp_path / "reference") == 0
    total = 120
    killed = tmp_path / "killed"
    proc = start_frozen_after(  # the real entry point, frozen once its 5th shard is on disk
        "clipit.shards.writer:write_tar",
        5,
        "--config",
        str(config),
        "--set",
        f"shards.dir={killed}",
        target="shards/build.py",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_stopped(proc, 120, "its 5th shard")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = len(list(killed.rglob("*.tar")))
    assert 5 <= done < total and not (killed / MANIFEST).exists()
    assert shard(config, killed) == 0  # rerun: skips finished shards, removes the dead run's temp files
    assert digests(killed) == digests(tmp_path / "reference") and len(digests(killed)) == total + 1
    assert not [p for p in killed.rglob("*") if p.name.startswith(".") and not is_lock(killed, p)]
    assert main(["shard", "validate", str(killed)]) == 0


@pytest.mark.parametrize("sets, rank", [(["shards.use_rank=2"], 2), (["shards.random_report_seed=7"], None)])
def test_ablation_selections_reach_the_shards(setup, sets, rank):
    import json

    import numpy as np

    from clipit.pairing.embedding_cache import load_text_embeddings
    from clipit.pairing.engine import load_pairs
    from clipit.shards.codec import decode_embedding
    from clipit.shards.manifest import load_manifest, sample_index, split_urls
    from clipit.shards.reader import iter_samples

    base, config = setup
    out = base / "variant"
    assert (
        main(
            [
                "shard",
                "build",
                "--config",
                str(config),
                "--set",
                f"shards.dir={out}",
                *[a for s in sets for a in ("--set", s)],
            ]
        )
        == 0
    )
    manifest = load_manifest(out)
    assert manifest["selection"] == ({"mode": "rank", "rank": 2} if rank else {"mode": "random", "seed": 7})
    pairs = load_pairs(base / "run" / "pairing" / "pairs-train.npz")
    text, ids = load_text_embeddings(base / "run" / "pairing" / "text-embeddings")
    chosen = []
    for sample in iter_samples(split_urls(out, "train")):
        i = sample_index(sample["__key__"])  # the train split is shuffled: the key holds the dataset index
        meta = json.loads(sample["json"])
        assert meta["rank"] == rank and meta["report_id"] == ids[meta["report_index"]]
        np.testing.assert_array_equal(
            decode_embedding(sample["emb.npy"]), text[meta["report_index"]].astype(np.float16)
        )
        chosen.append(meta["report_index"])
        if rank:
            assert meta["report_index"] == pairs["indices"][i, 1] and meta["score"] == pytest.approx(
                pairs["scores"][i, 1]
            )
        else:
            assert meta["score"] is None
    if rank is None:  # seeded: a rebuild draws the same texts
        again = base / "again"
        assert main(["shard", "build", "--config", str(config), "--set", f"shards.dir={again}", "--set", sets[0]]) == 0
        assert digests(again) == digests(out) and len(set(chosen)) > 3


def test_class_prompts_through_the_cli(setup, monkeypatch, capsys):
    from pairing.fakes import tiny_model

    import clipit.pairing.encoders

    base, config = setup
    monkeypatch.setattr(clipit.pairing.encoders, "build_pairing_model", lambda *a, **k: tiny_model())
    sets = ["--set", "pairing.texts=class_prompts", "--set", f"shards.dir={base / 'prompts'}"]
    assert main(["pair", "--config", str(config), *sets]) == 0
    assert "class agreement" in capsys.readouterr().out  # prompts carry their class
    assert main(["shard", "build", "--config", str(config), *sets]) == 0
    manifest = json.loads((base / "prompts" / MANIFEST).read_text())
    assert manifest["texts"]["kind"] == "class_prompts" and manifest["texts"]["count"] == 2 * 22


def test_embedding_bytes_round_trip_fast_and_foreign():
    import io

    import numpy as np

    from clipit.shards.codec import decode_embedding, encode_embedding

    for dim in (1, 16, 512, 768, 4096):
        v = np.random.default_rng(dim).normal(size=dim).astype(np.float16)
        got = decode_embedding(encode_embedding(v))
        assert got.dtype == np.float16 and got.shape == (dim,) and np.array_equal(got, v)
    buf = io.BytesIO()
    np.save(buf, np.arange(6, dtype=np.float32).reshape(2, 3))  # not ours: np.load path
    assert decode_embedding(buf.getvalue()).shape == (2, 3)


def is_lock(shard_dir, path):
    """The writers' lock files (clipit.locks keeps them; they are not output)."""
    return path.name == LOCK_FILE or LOCKS in path.relative_to(shard_dir).parts
