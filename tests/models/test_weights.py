"""Weights resolution: explicit setting -> weights file -> hub -> random (demo/tiny only)."""

import pytest
import torch
import yaml

from clipit.models.backbones import BACKBONES, build_backbone
from clipit.weights import RANDOM, WeightsError, read_weights_file, resolve, resolve_pairing_checkpoint
from clipit_testing import ROOT

HUB = "hf-hub:MahmoodLab/uni"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    monkeypatch.delenv("CLIPIT_WEIGHTS", raising=False)
    monkeypatch.delenv("CLIPIT_OFFLINE", raising=False)


@pytest.fixture()
def files(tmp_path):
    (tmp_path / "ckpt").mkdir()
    for name in ("a.pt", "b.pt", "c.pt"):
        (tmp_path / "ckpt" / name).write_bytes(b"x")
    wf = tmp_path / "weights.yaml"
    wf.write_text(f"uni: ckpt/b.pt\nconch: {tmp_path / 'ckpt' / 'c.pt'}\ngone: ckpt/missing.pt\nhubbed: {HUB}\n")
    return tmp_path, wf


def test_order_explicit_then_file_then_hub_then_random(files, monkeypatch):
    tmp, wf = files
    explicit = resolve("uni", tmp / "ckpt" / "a.pt", wf, HUB)
    assert (explicit.kind, explicit.location, explicit.origin) == ("file", str(tmp / "ckpt" / "a.pt"), "model.weights")
    from_file = resolve("uni", None, wf, HUB)  # relative paths are relative to the weights file
    assert (from_file.kind, from_file.location) == ("file", str((tmp / "ckpt" / "b.pt").resolve()))
    assert str(wf) in from_file.origin
    hub = resolve("kaiko-vits16", None, wf, "torch.hub:x/y:vits16")
    assert (hub.kind, hub.location, hub.origin) == ("hub", "torch.hub:x/y:vits16", "registry default")
    assert resolve("demo-vit-tiny", None, wf, None, random_ok=True).kind == "random"
    assert resolve("uni", RANDOM, wf, HUB).kind == "random" and resolve("uni", RANDOM, wf, HUB).stored == RANDOM
    monkeypatch.setenv("CLIPIT_WEIGHTS", str(wf))  # the environment names the file when the config does not
    assert resolve("uni", None, None, HUB).location == from_file.location


def test_errors_name_what_to_edit(files, monkeypatch):
    tmp, wf = files
    with pytest.raises(
        WeightsError, match="missing.pt: checkpoint for 'gone' not found; fix its line in the weights file"
    ):
        resolve("gone", None, wf, None)
    with pytest.raises(WeightsError, match="absent.pt: checkpoint for 'uni' not found; fix model.weights"):
        resolve("uni", tmp / "absent.pt", wf, HUB)
    with pytest.raises(WeightsError, match="weights file not found.*model.weights_file.*weights.example.yaml"):
        resolve("uni", None, tmp / "nope.yaml", HUB)
    monkeypatch.setenv("CLIPIT_OFFLINE", "1")
    with pytest.raises(
        WeightsError,
        match=f"no weights for 'kaiko-vitb8'.*add `kaiko-vitb8: /path/to/checkpoint` to the weights file {wf}",
    ):
        resolve("kaiko-vitb8", None, wf, "torch.hub:x/y:vitb8")
    with pytest.raises(WeightsError, match="hub download is off"):
        resolve("hubbed", None, wf, None)
    bad = tmp / "bad.yaml"
    bad.write_text("uni: [1, 2]\n")
    with pytest.raises(WeightsError, match="maps model names to paths"):
        read_weights_file(bad)


def test_hub_ids_from_the_file_are_kept(files):
    _, wf = files
    assert resolve("hubbed", None, wf, None).location == HUB


def test_pairing_checkpoint_falls_back_to_the_weights_file(files):
    tmp, wf = files
    assert resolve_pairing_checkpoint("conch", "/explicit/ckpt", wf) == "/explicit/ckpt"
    assert resolve_pairing_checkpoint("conch", None, wf) == str(tmp / "ckpt" / "c.pt")
    assert resolve_pairing_checkpoint("open_clip:ViT-B-16", None, wf) is None
    assert resolve_pairing_checkpoint("conch", None, None) is None


def test_weights_file_entry_loads_a_backbone(tmp_path, monkeypatch):
    model, _ = build_backbone("kaiko-vits16-tiny")
    torch.save(model.state_dict(), tmp_path / "tiny.pt")
    (tmp_path / "w.yaml").write_text("kaiko-vits16-tiny: tiny.pt\n")
    monkeypatch.setenv("CLIPIT_WEIGHTS", str(tmp_path / "w.yaml"))
    loaded, _ = build_backbone("kaiko-vits16-tiny")  # a tiny variant would be random without the file
    for (k, v), w in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(v, w), k


def test_example_weights_file_lists_every_pretrained_backbone():
    entries = yaml.safe_load((ROOT / "configs" / "weights.example.yaml").read_text())
    pretrained = {name for name, spec in BACKBONES.items() if not spec.random_init}
    assert pretrained <= set(entries)
    assert read_weights_file(ROOT / "configs" / "weights.example.yaml")["uni"] == "/shared/models/uni/pytorch_model.bin"
