"""A non-finite value put into the feature cache after it was written (its manifest hand-re-hashed, so the
checksums pass) is named with the cache file and the fix, not blamed on the shards or the learning rate."""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from clipit.io import sha256_file
from clipit_testing import ROOT, TINY, cli_main, shard_copy, with_shards

PROBE = ["methods.unimodal.epochs=1"]


def train(capsys, out: Path, shards, seed: int) -> tuple[int, list[str]]:
    """The probe on one backbone weights file, so that both seeds share one feature cache."""
    weights = out.parent / "backbone.safetensors"
    if not weights.exists():
        from clipit.models.backbones import build_backbone

        torch.manual_seed(0)
        backbone, _ = build_backbone("demo-vit-tiny", weights="random")
        save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(weights))
    sets = [f"output_dir={out}", *shards, *PROBE, f"model.weights={weights}"]
    argv = ["train", "--config", str(ROOT / TINY), "--method", "unimodal", "--seed", str(seed)]
    code = cli_main(argv + [a for s in sets for a in ("--set", s)])
    return code, capsys.readouterr().err.strip().splitlines()


def test_a_nan_in_cached_features_names_the_cache_file(tiny_shards, tmp_path, capsys):
    shards = with_shards(tiny_shards, shard_copy(tiny_shards, tmp_path))
    code, _ = train(capsys, tmp_path / "out", shards, seed=0)
    assert code == 0
    summary = json.loads((tmp_path / "out" / "runs" / "unimodal" / "seed-0" / "train_summary.json").read_text())
    cache = Path(summary["feature_cache"])
    part = cache / "train" / "train-000001.safetensors"
    tensors = load_file(str(part))
    tensors["features"][3, 5] = float("nan")
    from safetensors import safe_open

    with safe_open(str(part), framework="pt") as fh:
        metadata = fh.metadata()
    save_file(tensors, str(part), metadata=metadata)
    manifest_path = cache / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for entry in manifest["splits"]["train"]["files"]:
        if entry["path"].endswith(part.name):
            entry["sha256"] = sha256_file(part)  # a hand re-hash: the checksums alone would pass it
    manifest_path.write_text(json.dumps(manifest))
    for verified in cache.glob(".*verified*"):
        verified.unlink()

    code, err = train(capsys, tmp_path / "out", shards, seed=1)
    assert code == 2 and len(err) == 1, err
    key = json.loads(metadata["keys"])[3]
    assert err[0].startswith(f"clipit: error: {part}: features of sample {key} is not finite; the feature cache is")
    assert f"delete {cache}" in err[0] and "learning rate" not in err[0]
    assert not (tmp_path / "out" / "runs" / "unimodal" / "seed-1" / "train_summary.json").exists()
    assert torch.isnan(load_file(str(part))["features"]).any()  # the evidence is left for the user
