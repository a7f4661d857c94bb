"""CLIP-IT with the pairing model's text tower trained in the same step (text_encoder: tower), on real shards."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from clipit.config import ConfigError, load_config
from clipit.models.factory import build_model
from clipit.shards.manifest import ShardError, load_manifest, load_texts, split_urls
from clipit.training.loader import eval_loader
from clipit.training.text_side import TextInputs
from clipit_testing import TINY, cli, train_args

TOWER = ["methods.clipit.warm_start=null", "methods.clipit.text_encoder=tower", "methods.clipit.word_drop=0.3"]


def tiny_config(shards, *extra):
    return load_config(TINY, [*shards, *TOWER, *extra])


def test_tokens_follow_each_samples_report_index(tiny_shards):
    cfg = tiny_config(tiny_shards)
    manifest = load_manifest(cfg.shards.dir)
    texts = load_texts(cfg.shards.dir, manifest)
    assert len(texts) == manifest["texts"]["count"]
    model, _ = build_model(cfg, cfg.methods["clipit"], len(manifest["classes"]), manifest["embedding"]["dim"])
    inputs = TextInputs(model, cfg.methods["clipit"], cfg.shards.dir, manifest, torch.device("cpu"))
    batch = next(iter(eval_loader(split_urls(cfg.shards.dir, "train", manifest), 16)))
    got = inputs(batch, torch.device("cpu"))
    want = model.text_tower.tokenize([texts[i] for i in batch["report_index"].tolist()])
    assert torch.equal(got["tokens"], want) and got["masked"] is None  # no word drop outside training
    with torch.no_grad():  # before training, the tower reproduces the embeddings stored in the shards
        torch.testing.assert_close(model.text_tower.eval()(got["tokens"]), got["text_emb"], rtol=0, atol=2e-3)
    train = inputs(batch, torch.device("cpu"), train=True, generator=torch.Generator().manual_seed(0))
    assert train["masked"].any() and torch.equal(train["tokens"], want)
    broken = dict(batch, report_index=torch.full_like(batch["report_index"], -1))  # a shard without the field
    with pytest.raises(ShardError, match="without a valid report_index"):
        inputs(broken, torch.device("cpu"))
    model.text_tower.start_id = model.text_tower.end_id  # a tokenizer that marks no start of text
    with pytest.raises(ConfigError, match="marks no start of text"):
        TextInputs(model, cfg.methods["clipit"], cfg.shards.dir, manifest, torch.device("cpu"))


@pytest.mark.slow
def test_training_updates_the_tower_and_exports_without_it(tiny_shards, tmp_path):
    proc = cli(*train_args(tmp_path, tiny_shards, *TOWER))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "clipit" / "seed-0"
    best = load_file(str(run / "best.safetensors"))
    tower = {k: v for k, v in best.items() if k.startswith("text_tower.")}
    assert tower and all("lora_" in k for k in tower)  # frozen tower weights come from the pairing checkpoint
    assert any(k.endswith("lora_B.default.weight") and v.abs().sum() > 0 for k, v in tower.items())  # B starts at 0
    metrics = json.loads((run / "metrics.json").read_text())
    cfg = tiny_config(tiny_shards)
    vision_only, _ = build_model(cfg, cfg.methods["clipit"], 4, 512, text_tower=False)
    assert metrics["n"] == 128  # evaluation runs (and counts) the vision model only
    assert metrics["parameters"]["total"] == sum(p.numel() for p in vision_only.parameters())
    events = EventAccumulator(str(tmp_path / "tb" / "clipit" / "seed-0")).Reload()
    assert {"train/kd", "train/ce", "val/loss"} <= set(events.Tags()["scalars"])
    assert json.loads((run / "best.json").read_text())["train"]["text_encoder"] == "tower"
    export = tmp_path / "export"
    proc = cli("export", str(run), str(export))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not [k for k in load_file(str(export / "model.safetensors")) if "text_tower" in k or "lora_" in k]


def test_rerunning_the_shard_stage_restores_the_texts_file(tiny_shards, tmp_path):
    """A shard set from before texts.jsonl existed gets it from `clipit shard build`, without a rebuild."""
    original = Path(tiny_config(tiny_shards).shards.dir)
    old = tmp_path / "shards"
    shutil.copytree(original, old)
    (old / "texts.jsonl").unlink()
    tars = {p: p.stat().st_mtime_ns for p in old.rglob("*.tar")}
    sets = [a for s in [*tiny_shards, f"shards.dir={old}"] for a in ("--set", s)]
    proc = cli("shard", "build", "--config", TINY, *sets)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (old / "texts.jsonl").read_bytes() == (original / "texts.jsonl").read_bytes()
    assert {p: p.stat().st_mtime_ns for p in old.rglob("*.tar")} == tars  # no shard rewritten


def test_shards_without_their_texts_file_say_how_to_fix(tiny_shards, tmp_path):
    cfg = tiny_config(tiny_shards)
    copy = tmp_path / "shards"
    copy.mkdir()
    (copy / "manifest.json").write_text(Path(cfg.shards.dir, "manifest.json").read_text())
    with pytest.raises(ShardError, match=r"texts\.jsonl: missing; rerun `clipit shard"):
        load_texts(copy)
    (copy / "texts.jsonl").write_text(json.dumps({"id": "x", "text": "another corpus"}) + "\n")
    with pytest.raises(ShardError, match="does not match the texts the shards were paired with"):
        load_texts(copy)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["methods.clipit.text_encoder=cached", "methods.clipit.word_drop=0.3"], "word_drop needs text_encoder: tower"),
        (["methods.unimodal.text_encoder=tower"], "tower is for method clipit"),
        (["methods.clipit.word_drop=1.0"], r"word_drop = 1.0 is out of range; it must be in \[0, 1\)"),
        (["methods.clipit.text_encoder=tower", "methods.clipit.lam=0"], "tower needs lam > 0"),
    ],
)
def test_inconsistent_text_settings_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, overrides)
