"""The CLIP baselines (models/clip_baselines.py): the zero-shot prompt ensemble against a hand computation,
and zero_shot, prompt_ft and clip_probe trained, evaluated and exported through the real CLI on the tiny
demo's shards with its demo CLIP (pairing.model demo-clip)."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from clipit.config import ConfigError, load_config
from clipit.evaluation.export import export_run, load_exported, load_trained_run
from clipit.models.clip_baselines import PromptClassifier, class_prompts, prompt_ensemble, similarity_logits
from clipit.models.factory import build_model
from clipit.pairing.encoders import build_pairing_model
from clipit.pairing.texts import CONCH_TEMPLATES
from clipit.shards.manifest import load_manifest
from clipit.training.features import uses_feature_cache
from clipit_testing import TINY, assert_refused, cli, train_args

R = 1 / math.sqrt(2)


def test_zero_shot_logits_match_a_hand_computation():
    # 2 classes x 2 templates in a 2-d joint space, class-major
    prompts = torch.tensor(
        [
            [1.0, 0.0],
            [0.0, 1.0],  # class 0: mean of e1, e2 -> (1, 1)/sqrt 2
            [0.0, 2.0],
            [0.0, 1.0],
        ]
    )  # class 1: both normalise to e2 -> e2
    class_emb = prompt_ensemble(prompts, templates=2)
    torch.testing.assert_close(class_emb, torch.tensor([[R, R], [0.0, 1.0]]))
    images = torch.tensor([[3.0, 0.0], [0.0, 1.0], [1.0, -1.0]])  # normalised: e1, e2, (e1 - e2)/sqrt 2
    expected = torch.tensor(
        [
            [10 * R, 0.0],  # cos(e1, c0) = 1/sqrt 2, cos(e1, e2) = 0
            [10 * R, 10.0],
            [0.0, -10 * R],
        ]
    )
    torch.testing.assert_close(similarity_logits(images, class_emb, 10.0), expected)
    assert similarity_logits(images, class_emb, 10.0).argmax(1).tolist() == [0, 1, 0]

    class Identity(torch.nn.Module):  # the "vision tower" passes the embeddings through
        num_features = 2

        def forward(self, x):
            return x

    model = PromptClassifier(Identity(), num_classes=2, logit_scale=10.0)
    model.class_emb.copy_(class_emb)
    torch.testing.assert_close(model(images)["logits"], expected)
    assert [n for n, _ in model.named_parameters()] == []  # zero-shot: nothing to train


def test_prompts_are_class_major_and_class_names_are_checked(tiny_shards):
    cfg = load_config(TINY, [*tiny_shards, "clip.templates=['an image of CLASSNAME.', 'CLASSNAME, H&E.']"])
    classes = ["lymphocytes", "normal_mucosa"]
    prompts, templates = class_prompts(cfg, classes)
    assert templates == 2
    assert prompts == [
        "an image of lymphocytes.",
        "lymphocytes, H&E.",
        "an image of normal mucosa.",
        "normal mucosa, H&E.",
    ]
    cfg.pairing.class_names = ["lymphocytes", "mucosa", "stroma"]
    with pytest.raises(ConfigError, match="pairing.class_names has 3 names but .* hold 2 classes"):
        class_prompts(cfg, classes)
    assert len(class_prompts(load_config(TINY, tiny_shards), classes)[0]) == 2 * len(CONCH_TEMPLATES)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["methods.zs={method: zero_shot, finetune: lora}"], "zero_shot trains nothing"),
        (["methods.ft={method: prompt_ft}", "model.lora.enabled=false"], "prompt_ft with frozen towers trains nothing"),
        (["methods.p={method: clip_probe, warm_start: unimodal}"], "starts from the CLIP"),
        (["clip.templates=['an image of a tumour']"], r"clip.templates\[0\] .* has no CLASSNAME"),
    ],
)
def test_inconsistent_clip_settings_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, overrides)


def method_args(tmp_path, tiny_shards, method, *extra):
    return train_args(
        tmp_path,
        tiny_shards,
        f"methods.{method}={{method: {method}, epochs: 0.5, augment: false}}",
        *extra,
        method=method,
    )


def exported_matches_evaluated(run, out):
    export_run(run, out)
    config = json.loads((out / "config.json").read_text())
    model, preprocess, _ = load_exported(out)
    reference, _, _, _ = load_trained_run(run)
    images = torch.randint(0, 255, (3, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            model(preprocess(images))["logits"], reference(preprocess(images))["logits"], rtol=1e-4, atol=1e-4
        )
    return config


@pytest.mark.parametrize(
    "method",
    [
        "zero_shot",
        pytest.param("prompt_ft", marks=pytest.mark.slow),
        pytest.param("clip_probe", marks=pytest.mark.slow),
    ],
)
def test_each_clip_baseline_trains_evaluates_and_exports(method, tiny_shards, tmp_path):
    proc = cli(*method_args(tmp_path, tiny_shards, method))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / method / "seed-0"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["n"] == 128 and 0 <= metrics["balanced_accuracy"] <= 1
    best = load_file(str(run / "best.safetensors"))
    cfg = load_config(TINY, tiny_shards)
    classes = load_manifest(cfg.shards.dir)["classes"]
    params = metrics["parameters"]
    if method == "clip_probe":  # the vision tower comes from the CLIP checkpoint: only the head is stored
        assert set(best) == {"head.weight", "head.bias"} and params["trainable"] == 4 * 512 + 4
        cfg = load_config(TINY, [*tiny_shards, f"methods.{method}={{method: {method}, augment: false}}"])
        model, _ = build_model(cfg, cfg.methods[method], len(classes), 512)
        assert uses_feature_cache(cfg, method, model)  # frozen + unaugmented: the feature cache's hook
        exported_matches_evaluated(run, tmp_path / "export")
        return
    # the prompt classifiers: test time runs the vision tower on cached class embeddings
    assert params["cached_class_embeddings"] == 4 * 512  # every value a count: the report reads them all
    assert all(isinstance(v, int) and not isinstance(v, bool) for v in params.values()), params
    report = cli("report", str(tmp_path), "--out", str(tmp_path / "report"), "--no-plots")
    assert report.returncode == 0 and "left out" not in report.stderr, report.stderr
    assert f",{method}," in (tmp_path / "report" / "runs.csv").read_text()
    assert (
        params["inference"]
        == params["total"]
        - sum(v.numel() for k, v in best.items() if "lora_" in k and k.startswith("backbone."))
        + 4 * 512
    )
    assert params["text_tower_once"] > params["inference"]  # the demo CLIP's text side is the bigger one
    pairing = build_pairing_model("demo-clip", cfg.pairing.checkpoint, device="cpu")
    prompts, templates = class_prompts(cfg, classes)
    zero_shot = prompt_ensemble(pairing.encode_texts(prompts), templates)
    if method == "zero_shot":
        torch.testing.assert_close(best["class_emb"], zero_shot, rtol=0, atol=1e-5)
        assert set(best) == {"class_emb", "log_scale"} and params["trainable"] == 0
        summary = json.loads((run / "train_summary.json").read_text())
        assert summary["steps"] == 0 and summary["parameters"]["inference"] == params["inference"]
    else:  # prompt_ft: LoRA in both towers moved the class embeddings
        assert any(k.startswith("text_tower.") and "lora_B" in k and v.abs().sum() > 0 for k, v in best.items())
        assert any(k.startswith("backbone.") and "lora_B" in k for k in best)
        assert not torch.allclose(best["class_emb"], zero_shot, atol=1e-4)
        torch.testing.assert_close(best["class_emb"].norm(dim=1), torch.ones(4))
    config = exported_matches_evaluated(run, tmp_path / "export")
    assert config["inference_cost"]["cached_class_embeddings"] == 4 * 512 and config["clip"]["model"] == "demo-clip"
    assert not [k for k in load_file(str(tmp_path / "export" / "model.safetensors")) if "lora_" in k or "text_" in k]
    assert np.isfinite(np.load(run / "predictions-test.npz")["logits"]).all()


def test_class_names_of_the_wrong_length_are_one_line_and_exit_2(tiny_shards, tmp_path):
    proc = cli(*method_args(tmp_path, tiny_shards, "zero_shot", "pairing.class_names=[normal, tumor]"))
    assert_refused(
        proc,
        tmp_path / "runs" / "zero_shot" / "seed-0",
        "pairing.class_names has 2 names",
        "hold 4 classes",
        absent=("best.json", "train_summary.json"),
    )
