"""Bad inputs to pairing and shard building: one line naming the file and the fix, exit 2, no partial shard."""

import json

import h5py
import numpy as np
import pytest
from pairing.fakes import make_images, make_reports, pair_with_tiny_model, tiny_model, write_config

import clipit.pairing.encoders
from clipit.cli import main
from clipit.data.base import DatasetError
from clipit.data.folder import ImageFolderDataset
from clipit.data.pcam import PCamDataset, pcam_file
from clipit.locks import LOCK_FILE
from clipit.pairing.engine import embed_images, load_pairs
from clipit.shards.manifest import LOCKS
from clipit.shards.order import split_order
from clipit.shards.writer import write_split_shards


def run(capsys, *argv) -> tuple[int, str]:
    """The CLI in this process; returns (exit status, the error line)."""
    code = main(list(argv))
    errors = [ln for ln in capsys.readouterr().err.replace("\r", "\n").splitlines() if ln.startswith("clipit: error:")]
    assert len(errors) == (1 if code else 0), errors
    return code, errors[0] if errors else ""


@pytest.fixture()
def setup(tmp_path):
    images = make_images(tmp_path / "images", {"train": 10, "val": 4, "test": 4})
    config = write_config(tmp_path, images, make_reports(tmp_path / "reports.jsonl"))
    return tmp_path, images, config


def no_partial_shards(shard_dir):
    """No temporary file and no manifest (the writers' lock files are not output: clipit.locks keeps them)."""
    return not [
        p
        for p in shard_dir.rglob("*")
        if (p.name.startswith(".") and not is_lock(shard_dir, p)) or p.name == "manifest.json"
    ]


def is_lock(shard_dir, path):
    return path.name == LOCK_FILE or LOCKS in path.relative_to(shard_dir).parts


def test_corrupt_image_fails_the_shard_build(setup, capsys):
    base, images, config = setup
    pair_with_tiny_model(config)
    bad = images / "train" / "tumor" / "train_0005.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated PNG: the header parses, the pixels do not
    code, line = run(capsys, "shard", "build", "--config", str(config))
    assert code == 2 and line.startswith(f"clipit: error: {bad}: cannot decode image") and "replace or delete" in line
    shards = base / "run" / "shards"
    # the train split is written in a seeded permutation (build.json's order): the bad image's shard stops
    # the build, the shards written before it stay
    order = split_order(json.loads((shards / "build.json").read_text()), "train")
    keys = ImageFolderDataset(images).keys("train")
    bad_shard = int(np.flatnonzero(order == keys.index(next(k for k in keys if k.endswith("train_0005"))))[0]) // 4
    for index in range(3):
        assert (shards / "train" / f"train-{index:06d}.tar").exists() == (index < bad_shard), index
    assert no_partial_shards(shards)


def test_corrupt_image_fails_pairing(setup, capsys, monkeypatch):
    base, images, config = setup
    monkeypatch.setattr(clipit.pairing.encoders, "build_pairing_model", lambda *a, **k: tiny_model())
    bad = images / "val" / "benign" / "val_0002.png"
    bad.write_bytes(b"definitely not an image")
    code, line = run(capsys, "pair", "--config", str(config))
    assert code == 2 and line.startswith(f"clipit: error: {bad}: cannot decode image")
    assert not list((base / "run" / "pairing").glob("pairs-val*"))


def test_empty_corpus(setup, capsys):
    base, _, config = setup
    (base / "reports.jsonl").write_text(json.dumps({"id": "R0", "text": "   "}) + "\n")
    code, line = run(capsys, "pair", "--config", str(config))
    assert code == 2 and f"{base / 'reports.jsonl'}: no reports" in line


def test_text_dim_differs_from_the_config(setup, capsys):
    base, _, config = setup
    pair_with_tiny_model(config)
    code, line = run(capsys, "shard", "build", "--config", str(config), "--set", "model.text_dim=512")
    emb = base / "run" / "pairing" / "text-embeddings" / "embeddings.npy"
    assert code == 2 and line == (
        f"clipit: error: {emb}: text embeddings are 16-d but model.text_dim is 512; "
        "set model.text_dim: 16 in the config (or pair with a 512-d model)"
    )
    assert not (base / "run" / "shards").exists()


def test_pairs_that_point_past_the_embeddings(setup, capsys):
    base, _, config = setup
    paths = pair_with_tiny_model(config)
    pairs = load_pairs(paths["test"])
    pairs["indices"][1, 0] = 99  # the cache holds 12 texts
    np.savez(paths["test"], **pairs)
    code, line = run(capsys, "shard", "build", "--config", str(config))
    assert code == 2 and line.startswith(f"clipit: error: {paths['test']}: pairs point at text 99 but ")
    assert "rerun `clipit pair`" in line and not (base / "run" / "shards").exists()


def test_texts_changed_after_pairing(setup, capsys):
    base, _, config = setup
    pair_with_tiny_model(config)
    code, line = run(
        capsys,
        "shard",
        "build",
        "--config",
        str(config),
        "--set",
        "shards.dir=" + str(base / "s"),
        "--set",
        "pairing.texts=class_prompts",
        "--part",
        "0",
        "--num-parts",
        "1",
    )
    assert code == 2 and "pairs for this config are missing or were made with other settings" in line


# ------------------------------------------------------------------------------------------- PCAM h5


def write_pcam(root, n=8, corrupt_split=None):
    """Tiny PCAM files (gzip-chunked like the official ones); optionally smash one x file's chunk data."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val", "test"):
        with h5py.File(pcam_file(root, split, "x"), "w") as f:
            f.create_dataset(
                "x",
                data=rng.integers(0, 255, (n, 96, 96, 3), dtype=np.uint8),
                chunks=(1, 96, 96, 3),
                compression="gzip",
            )
            offset = f["x"].id.get_chunk_info(n - 1).byte_offset
        with h5py.File(pcam_file(root, split, "y"), "w") as f:
            f.create_dataset("y", data=(np.arange(n) % 2).astype(np.uint8).reshape(n, 1, 1, 1))
        if split == corrupt_split:
            with open(pcam_file(root, split, "x"), "r+b") as fh:
                fh.seek(offset)
                fh.write(b"\xff" * 64)
    return root


def test_unreadable_h5_file(tmp_path):
    root = write_pcam(tmp_path / "pcam")
    pcam_file(root, "val", "x").write_bytes(b"not hdf5 at all")
    with pytest.raises(DatasetError) as err:
        PCamDataset(root, expected_sizes=None)
    assert str(err.value).startswith(f"{pcam_file(root, 'val', 'x')}: not a readable HDF5 file") and "\n" not in str(
        err.value
    )


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_h5_chunk_during_pairing_and_sharding(tmp_path, workers):
    root = write_pcam(tmp_path / "pcam", corrupt_split="train")
    dataset = PCamDataset(root, expected_sizes=None)
    xfile = pcam_file(root, "train", "x")
    with pytest.raises(DatasetError) as err:
        embed_images(tiny_model(), dataset, "train", batch_size=4, num_workers=workers)
    assert str(err.value).startswith(f"{xfile}: cannot read patches 7..7") and "\n" not in str(err.value)
    pairs = {"indices": np.zeros((8, 1), dtype=np.int64), "scores": np.zeros((8, 1), dtype=np.float32)}
    out = tmp_path / "shards"
    with pytest.raises(DatasetError, match="cannot read patches 7..7"):
        write_split_shards(dataset, "train", pairs, np.ones((1, 4), np.float32), ["R0"], out, samples_per_shard=4)
    assert (out / "train" / "train-000000.tar").exists() and not (out / "train" / "train-000001.tar").exists()
    assert no_partial_shards(out)


def test_shards_of_another_embedding_model_are_not_mixed(setup, capsys):
    base, _, config = setup
    pair_with_tiny_model(config)
    assert run(capsys, "shard", "build", "--config", str(config), "--part", "0", "--num-parts", "2")[0] == 0
    pair_with_tiny_model(config, dim=8)  # pairing redone with an 8-d model: the cache and pairs change
    code, line = run(capsys, "shard", "build", "--config", str(config), "--set", "model.text_dim=8")
    plan = base / "run" / "shards" / "build.json"
    assert code == 2 and line.startswith(
        f"clipit: error: {plan}: the shards in {plan.parent} were built under another config ("
    )
    assert "pairing.embedding.dim: 16 then, 8 now" in line and "set shards.dir to a new folder" in line
    assert not (plan.parent / "manifest.json").exists()
