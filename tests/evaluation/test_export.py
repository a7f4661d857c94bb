"""Export merges LoRA and keeps the predictions: the exported model's probabilities equal the
unmerged model's evaluation output, and `clipit predict` on the stored PNGs gives the same numbers."""

import io
import json

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from PIL import Image
from safetensors.torch import load_file

from clipit.cli import main
from clipit.config import ExperimentConfig, LoraConfig, ModelConfig, ShardsConfig, TrainConfig, dump_config
from clipit.data.folder import ImageFolderDataset
from clipit.evaluation.export import ExportError, export_run, load_exported, load_trained_run, merge_lora
from clipit.models.backbones import build_backbone
from clipit.models.checkpoint import save_model
from clipit.models.factory import build_model
from clipit.shards.manifest import split_urls
from clipit.shards.reader import iter_samples
from clipit.shards.writer import write_manifest, write_split_shards
from clipit.training.loader import eval_loader
from clipit.training.predict import predict

D = 16
CLASSES = ["benign", "tumor", "stroma"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("CLIPIT_OFFLINE", "1")
    monkeypatch.delenv("CLIPIT_WEIGHTS", raising=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A unimodal probe and a CLIP-IT run warm-started from it, with randomised LoRA and heads,
    saved the way `fit` saves them (trainable tensors only: the backbone comes from a weights file)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("CLIPIT_OFFLINE", "1")
    tmp = tmp_path_factory.mktemp("export")
    rng = np.random.default_rng(0)
    for i in range(10):  # 80 px tiles: the loader shrinks them to the 64 px input before the device
        path = tmp / "images" / "test" / CLASSES[i % 3] / f"img{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (80, 80, 3), dtype=np.uint8)).save(path)
    dataset = ImageFolderDataset(tmp / "images", splits=("test",), classes=CLASSES)
    text = rng.normal(size=(5, D)).astype(np.float32)
    pairs = {"indices": rng.integers(0, 5, (10, 1)), "scores": rng.random((10, 1)).astype(np.float32)}
    shards = tmp / "shards"
    write_split_shards(dataset, "test", pairs, text, [f"R{i}" for i in range(5)], shards, 4)
    write_manifest(dataset, shards, 4, D, {"model": "test"})

    backbone, _ = build_backbone("kaiko-vits16-tiny")
    torch.save(
        {"state_dict": {f"backbone._model.{k}": v for k, v in backbone.state_dict().items()}}, tmp / "vits16-tiny.ckpt"
    )
    (tmp / "weights.yaml").write_text("kaiko-vits16-tiny: vits16-tiny.ckpt\n")
    cfg = ExperimentConfig(
        output_dir=str(tmp),
        shards=ShardsConfig(dir=str(shards)),
        model=ModelConfig(
            backbone="kaiko-vits16-tiny",
            weights_file=str(tmp / "weights.yaml"),
            text_dim=D,
            lora=LoraConfig(r=4, alpha=8, targets=["Linear", "Conv2d"]),
        ),
    )
    cfg.data.root, cfg.reports.path = str(tmp / "images"), str(tmp / "reports.jsonl")
    cfg.methods = {
        "unimodal": TrainConfig(method="unimodal"),
        "clipit": TrainConfig(method="clipit", warm_start="unimodal"),
        "late": TrainConfig(method="late_fusion", warm_start="unimodal"),
    }
    torch.manual_seed(0)
    runs = {}
    for name in ("unimodal", "clipit", "late"):
        run = tmp / "runs" / name / "seed-0"
        warm = tmp / "runs" / "unimodal" / "seed-0" / "best" if cfg.methods[name].warm_start else None
        model, preprocess = build_model(cfg, cfg.methods[name], len(CLASSES), D, warm_start=warm)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:  # as if trained: LoRA B nonzero, heads moved
                    p.copy_(torch.randn_like(p) * 0.2)
        meta = {"method": name, "seed": 0, "classes": CLASSES, "text_dim": D, "image_size": preprocess.size, "step": 7}
        save_model(run / "best", model, meta, full=False)
        dump_config(cfg, run / "config.yaml")
        (run / "train_summary.json").write_text(json.dumps({"steps": 7}))  # export takes finished runs only
        runs[name] = (run, model.eval(), preprocess)
    mp.undo()
    return tmp, shards, runs


def evaluation_probs(model, preprocess, shards):
    out = predict(
        model,
        preprocess,
        eval_loader(split_urls(shards, "test"), 4, load_size=preprocess.size),
        Accelerator(cpu=True),
        lam=1.0,
    )
    return out["keys"], torch.softmax(torch.from_numpy(out["logits"]), dim=1).numpy()


@pytest.mark.parametrize("name", ["clipit", "unimodal"])
def test_export_matches_unmerged_evaluation(trained, tmp_path, name, capsys):
    tmp, shards, runs = trained
    run, model, preprocess = runs[name]
    keys, want = evaluation_probs(model, preprocess, shards)

    rebuilt, rebuilt_pre, _, _ = load_trained_run(run)  # from disk: weights file + warm start + best
    _, again = evaluation_probs(rebuilt, rebuilt_pre, shards)
    np.testing.assert_allclose(again, want, atol=1e-6)

    out = export_run(run, tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    assert config["classes"] == CLASSES and config["backbone"] == "kaiko-vits16-tiny" and config["input_size"] == 64
    assert config["mean"] == [0.5, 0.5, 0.5] and config["method"] == name
    exported, ex_pre, _ = load_exported(out)
    assert not any("lora_" in n for n, _ in exported.named_parameters())
    if name == "clipit":
        assert {"proj", "text_head", "fuse"} <= {n.split(".")[0] for n, _ in exported.named_parameters()}
    _, got = evaluation_probs(exported, ex_pre, shards)
    np.testing.assert_allclose(got, want, atol=1e-5)

    # `clipit predict` on the stored image files: same decode -> uint8 -> DevicePreprocess path
    files = []
    for sample in iter_samples(split_urls(shards, "test")):
        path = tmp_path / "png" / f"{sample['__key__']}.png"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(sample["png"])
        files.append(path)
    capsys.readouterr()  # only predict's own output (the evaluation above may import DeepSpeed, which logs to stdout)
    assert main(["predict", str(out), *map(str, files), "--json"]) == 0
    printed = {row["image"]: row for row in json.loads(capsys.readouterr().out)}
    by_key = {f.stem: printed[str(f)] for f in files}
    cli = np.array([[by_key[k]["probabilities"][c] for c in CLASSES] for k in keys])
    np.testing.assert_allclose(cli, want, atol=1e-5)
    assert [by_key[k]["prediction"] for k in keys] == [CLASSES[i] for i in want.argmax(1)]
    assert main(["predict", str(out), *map(str, files[:2])]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split("\t") == ["image", "prediction", *CLASSES] and len(table) == 3


def test_merge_folds_adapters_into_plain_layers(trained):
    _, _, runs = trained
    _, model, _ = runs["clipit"]
    run = runs["clipit"][0]
    unmerged, _, _, _ = load_trained_run(run)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = unmerged(x)["logits"]
        merged = merge_lora(unmerged)
        assert type(merged.head) is torch.nn.Linear and type(merged.backbone.patch_embed.proj) is torch.nn.Conv2d
        torch.testing.assert_close(merged(x)["logits"], want, atol=1e-5, rtol=1e-5)


def test_text_methods_are_not_exportable(trained, tmp_path, capsys):
    _, _, runs = trained
    with pytest.raises(ExportError, match="uses the paired report at test time"):
        export_run(runs["late"][0], tmp_path / "x")
    assert main(["export", str(runs["late"][0]), str(tmp_path / "x")]) == 2
    assert "only vision-only methods" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "nothing"), "a.png"]) == 2
    assert "not a clipit export" in capsys.readouterr().err


def test_missing_warm_start_is_reported(trained, tmp_path):
    tmp, _, runs = trained
    import shutil

    copy = tmp_path / "runs" / "clipit" / "seed-0"
    shutil.copytree(runs["clipit"][0], copy)
    with pytest.raises(ExportError, match="warm start of .* is missing"):
        load_trained_run(copy)


def plain_timm(export, images) -> tuple[np.ndarray, np.ndarray]:
    """(features, linear-head probabilities) the way a timm user computes them: timm + safetensors only."""
    import safetensors.torch
    import timm

    cfg = json.loads((export / "config.json").read_text())
    backbone = timm.create_model(cfg["timm"]["architecture"], pretrained=False, **cfg["timm"]["kwargs"])
    backbone.load_state_dict(safetensors.torch.load_file(export / cfg["backbone_file"]), strict=True)
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255 for p in images])
    mean, std = (torch.tensor(cfg[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    with torch.no_grad():
        features = backbone.eval()((torch.from_numpy(pixels).permute(0, 3, 1, 2) - mean) / std)
    head = safetensors.torch.load_file(export / "model.safetensors")
    logits = features @ head["head.weight"].T + head["head.bias"]
    return features.numpy(), torch.softmax(logits, 1).numpy()


@pytest.mark.parametrize("name", ["clipit", "unimodal"])
def test_backbone_file_loads_in_plain_timm_and_matches_predict(trained, tmp_path, name, capsys):
    """An eva / timm user's path: timm.create_model + safetensors + strict load, no clipit and no key
    prefixes; the features equal `clipit predict --features` (LoRA merged), and for the linear probe the
    logits of model.safetensors' head equal predict's probabilities."""
    _, shards, runs = trained
    out = export_run(runs[name][0], tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    assert config["timm"] == {
        "architecture": "vit_small_patch16_224",
        "kwargs": {
            "num_classes": 0,
            "dynamic_img_size": True,
            "embed_dim": 32,
            "depth": 2,
            "num_heads": 2,
            "img_size": 64,
        },
    }
    card = (out / "README.md").read_text()
    assert "timm.create_model" in card and "kaiko-vits16-tiny" in card and "provenance" in card
    files = []
    for sample in iter_samples(split_urls(shards, "test")):  # 80 px PNGs: brought to 64 px as predict does
        image = Image.open(io.BytesIO(sample["png"])).convert("RGB").resize((64, 64), Image.BILINEAR)
        files.append(tmp_path / f"{sample['__key__']}.png")
        image.save(files[-1])
    capsys.readouterr()
    rows = tmp_path / "p.json"
    assert (
        main(["predict", str(out), *map(str, files), "--out", str(rows), "--features", str(tmp_path / "f.safetensors")])
        == 0
    )
    want_features = load_file(str(tmp_path / "f.safetensors"))["features"].numpy()
    features, probs = plain_timm(out, files)
    np.testing.assert_allclose(features, want_features, atol=1e-5)
    if name == "unimodal":  # the linear probe's logits: features @ W.T + b
        predicted = [[r["probabilities"][c] for c in CLASSES] for r in json.loads(rows.read_text())]
        np.testing.assert_allclose(probs, np.array(predicted), atol=1e-5)
