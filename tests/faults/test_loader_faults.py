"""The training and evaluation loaders check a raw sample's recorded shape against the shard set's
manifest: a sample whose json claims another shape of the same byte count (behind a hand-re-hashed
manifest) would otherwise be trained on as garbled pixels."""

import hashlib
import io
import json
import tarfile

import pytest

from clipit.shards.manifest import MANIFEST, ShardError, load_manifest, split_urls
from clipit.training.loader import eval_loader
from clipit_testing import ROOT, TINY, cli_main, shard_copy, with_shards, written_key

SHARD, KEY = "train/train-000001.tar", written_key("train", 70)  # the train split is written shuffled


def garble_shape(shard_dir) -> None:
    """Sample KEY's json says 32 x 128 (the bytes of 64 x 64), and the manifest is re-hashed by hand."""
    path = shard_dir / SHARD
    with tarfile.open(path) as tar:
        items = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    meta = json.loads(dict(items)[f"{KEY}.json"])
    assert meta["image_shape"] == [64, 64, 3]
    meta["image_shape"] = [32, 128, 3]
    items = [(n, json.dumps(meta).encode() if n == f"{KEY}.json" else d) for n, d in items]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in items:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o444
            tar.addfile(info, io.BytesIO(data))
    manifest = json.loads((shard_dir / MANIFEST).read_text())
    for info in manifest["splits"].values():
        for shard in info["shards"]:
            shard["sha256"] = hashlib.sha256((shard_dir / shard["path"]).read_bytes()).hexdigest()
    (shard_dir / MANIFEST).write_text(json.dumps(manifest))
    for verified in shard_dir.glob(".manifest.verified*"):
        verified.unlink()


def test_the_loader_refuses_a_raw_sample_of_another_shape(tiny_shards, tmp_path):
    shard_dir = shard_copy(tiny_shards, tmp_path)
    garble_shape(shard_dir)
    manifest = load_manifest(shard_dir)
    urls = split_urls(shard_dir, "train", manifest)
    with pytest.raises(ShardError) as err:
        for _ in eval_loader(urls, 64, image=manifest["image"]):
            pass
    assert str(err.value).startswith(f"{shard_dir / SHARD}: sample {KEY}: image_shape [32, 128, 3] where the manifest")


def test_training_on_it_stops_in_one_line(tiny_shards, tmp_path, capsys):
    shards = with_shards(tiny_shards, shard_copy(tiny_shards, tmp_path))
    garble_shape(tmp_path / "shards")
    sets = [f"output_dir={tmp_path / 'out'}", *shards, "methods.unimodal.epochs=1"]
    argv = ["train", "--config", str(ROOT / TINY), "--method", "unimodal", "--seed", "0"]
    code = cli_main(argv + [a for s in sets for a in ("--set", s)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert f"sample {KEY}: image_shape [32, 128, 3] where the manifest's raw codec has [64, 64, 3]" in err[0]
    assert not (tmp_path / "out" / "runs" / "unimodal" / "seed-0" / "train_summary.json").exists()
