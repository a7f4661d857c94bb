"""`clipit doctor CONFIG`: one ✓/✗ line per check, exit 2 on a missing or mismatched checkpoint."""

import json

import pytest
import torch
import yaml
from PIL import Image

from clipit.cli import main
from clipit.models.backbones import build_backbone


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("CLIPIT_OFFLINE", "1")
    monkeypatch.delenv("CLIPIT_WEIGHTS", raising=False)


@pytest.fixture()
def site(tmp_path):
    """A folder dataset, a report corpus, a good checkpoint, a checkpoint of another backbone."""
    for split in ("train", "val", "test"):  # doctor lists the dataset as `clipit pair` does: every split, an image each
        (tmp_path / "images" / split / "a").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "images" / split / "a" / "x.png")
    (tmp_path / "reports.jsonl").write_text('{"id": "r1", "text": "invasive ductal carcinoma"}\n')
    good, _ = build_backbone("kaiko-vits16-tiny")
    torch.save(
        {"state_dict": {f"backbone._model.{k}": v for k, v in good.state_dict().items()}}, tmp_path / "good.ckpt"
    )
    other, _ = build_backbone("demo-vit-tiny")
    torch.save(other.state_dict(), tmp_path / "other.pt")
    return tmp_path


def write_config(site, weights: str, text_dim: int = 512, **model):
    (site / "weights.yaml").write_text(f"kaiko-vits16-tiny: {weights}\n")
    cfg = {
        "output_dir": str(site / "out"),
        "data": {"name": "folder", "root": str(site / "images")},
        "reports": {"path": str(site / "reports.jsonl")},
        "pairing": {"model": "demo-clip"},
        "model": {
            "backbone": "kaiko-vits16-tiny",
            "weights_file": str(site / "weights.yaml"),
            "text_dim": text_dim,
            **model,
        },
        "methods": {"unimodal": {"method": "unimodal"}, "clipit": {"method": "clipit", "warm_start": "unimodal"}},
    }
    path = site / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def doctor(capsys, path, *extra):
    code = main(["doctor", str(path), *extra])
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err


def test_good_checkpoint_passes(site, capsys):
    code, lines, err = doctor(capsys, write_config(site, "good.ckpt"))
    assert code == 0, lines
    assert f"✓ data: {site / 'images'} exists" in lines
    assert any(line.startswith("✓ backbone kaiko-vits16-tiny: weights") and "good.ckpt" in line for line in lines)
    assert "✓ backbone kaiko-vits16-tiny: strict load: every tensor of the checkpoint fits" in lines
    assert "✓ backbone kaiko-vits16-tiny: output width 32 at 64 px, as declared" in lines
    assert "✓ method clipit: clipit, fine-tuning lora, warm start unimodal" in lines
    assert lines[-1] == "all checks passed" and not any(line.startswith("✗") for line in lines)


def test_missing_checkpoint_exits_2_naming_the_weights_file(site, capsys):
    code, lines, err = doctor(capsys, write_config(site, "nowhere.ckpt"))
    assert code == 2
    bad = [line for line in lines if line.startswith("✗")]
    assert len(bad) == 1 and "nowhere.ckpt: checkpoint for 'kaiko-vits16-tiny' not found" in bad[0]
    assert f"weights file {site / 'weights.yaml'}" in bad[0]
    assert "1 problem(s)" in err


def test_mismatched_shapes_exit_2(site, capsys):
    code, lines, _ = doctor(capsys, write_config(site, "other.pt"))
    assert code == 2
    bad = [line for line in lines if line.startswith("✗")]
    assert len(bad) == 1 and "does not fit backbone 'kaiko-vits16-tiny'" in bad[0] and "of another shape" in bad[0]


def test_shard_dims_paths_and_pairing(site, capsys):
    shards = site / "out" / "shards"
    shards.mkdir(parents=True)
    manifest = {"classes": ["a", "b"], "embedding": {"dim": 384}, "splits": {"train": {"count": 5}}}
    (shards / "manifest.json").write_text(json.dumps(manifest | {"order": {"train": {"count": 5}}}))
    path = write_config(site, "good.ckpt")
    code, lines, _ = doctor(capsys, path, "--set", "data.root=/no/such/dir")
    assert code == 2
    assert "✗ data: /no/such/dir not found; fix data.root" in lines
    assert any(line.startswith("✗ shards:") and "384-d but model.text_dim is 512" in line for line in lines)
    # a real pairing model without weights: fatal only while the shards still have to be built
    code, lines, _ = doctor(capsys, path, "--set", "model.text_dim=384", "--set", "pairing.model=conch")
    assert code == 0 and any(line.startswith("· pairing model conch: no weights") for line in lines)
    # ... or while a method trains its text tower (the pairing model is then needed at training time)
    code, lines, _ = doctor(
        capsys,
        path,
        "--set",
        "model.text_dim=384",
        "--set",
        "pairing.model=conch",
        "--set",
        "methods.clipit.text_encoder=tower",
        "--set",
        "methods.clipit.word_drop=0.3",
    )
    assert code == 2 and any(
        line.startswith("✗ pairing model conch (text tower of clipit): no weights") for line in lines
    )
    assert (
        "✓ method clipit: clipit, fine-tuning lora, warm start unimodal, text tower with 30% word drop (mask)" in lines
    )
    (shards / "manifest.json").write_text(json.dumps(manifest))  # written in dataset order: training refuses it
    code, lines, _ = doctor(capsys, path, "--set", "model.text_dim=384")
    assert code == 2 and any(
        line.startswith("✗ shards:") and "written in dataset order" in line and "clipit shard build" in line
        for line in lines
    )
    (shards / "manifest.json").unlink()
    code, lines, _ = doctor(capsys, path, "--set", "pairing.model=conch")
    assert code == 2 and any(line.startswith("✗ pairing model conch: no weights") for line in lines)


def test_unknown_warm_start_and_usage(site, capsys):
    path = write_config(site, "good.ckpt")
    code, _, err = doctor(capsys, path, "--set", "methods.clipit.warm_start=probe")
    assert code == 2 and "methods.clipit warm-starts from unknown method 'probe'" in err and len(err.splitlines()) == 1
    assert main(["doctor"]) == 2
    assert "give the config once" in capsys.readouterr().err


def test_an_input_size_that_is_not_a_multiple_of_the_patch_warns(tmp_path, capsys):
    """64 px with 14-px patches silently drops 8 rows and columns: doctor says so (a warning: it runs)."""
    from clipit_testing import ROOT, TINY

    sets = ["--set", f"output_dir={tmp_path}", "--set", "model.image_size=60"]
    code = main(["doctor", str(ROOT / TINY), *sets])
    lines = capsys.readouterr().out.splitlines()
    assert code == 0, lines
    assert (
        "! backbone demo-vit-tiny: 60 px is not a multiple of its 8-px patches: the last 4 rows and columns of "
        "every image are never seen; set model.image_size to 56 or 64"
    ) in lines
    code = main(["doctor", str(ROOT / TINY), "--set", f"output_dir={tmp_path}", "--set", "model.image_size=64"])
    assert code == 0 and not any(line.startswith("!") for line in capsys.readouterr().out.splitlines())
