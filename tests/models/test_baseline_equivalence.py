"""The CLIP baselines' reference recipe, each switch against a hand computation of what the authors' code
(BanafshehKarimian/ModalityPairing, Models/{CONCH,QUILT,PLIP,PathCLIP}Net.py) does: symmetric InfoNCE at
tau 0.07 against the first template (prompt_loss: infonce) and the mean of per-template logits
(clip.ensemble: logits); then prompt_ft with both switches trained through the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from clipit.config import ConfigError, load_config
from clipit.models.clip_baselines import PromptClassifier, prompt_ensemble, similarity_logits
from clipit.models.clipit import clipit_loss
from clipit.models.losses import REFERENCE_TAU, symmetric_infonce
from clipit_testing import TINY, cli, train_args


def test_symmetric_infonce_is_the_reference_loss_by_hand():
    image = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 3.0]])  # images 0 and 1 share a class prompt
    i = image / image.norm(dim=1, keepdim=True)
    t = text / text.norm(dim=1, keepdim=True)
    sim = [[float(i[a] @ t[b]) / 0.07 for b in range(3)] for a in range(3)]

    def ce(rows):  # mean over rows of -log softmax(row)[diagonal]
        return sum(math.log(sum(math.exp(v) for v in row)) - row[k] for k, row in enumerate(rows)) / len(rows)

    expected = (ce(sim) + ce([list(col) for col in zip(*sim)])) / 2
    assert REFERENCE_TAU == 0.07
    assert float(symmetric_infonce(image, text)) == pytest.approx(expected, rel=1e-5)


def test_mean_of_logits_ensemble_equals_the_per_template_mean_by_hand():
    # 2 classes x 3 templates, class-major, unnormalised as a text tower may give them
    prompts = torch.tensor([[3.0, 0.0], [1.0, 1.0], [0.0, 0.5], [0.0, 2.0], [-1.0, 1.0], [1.0, -2.0]])
    images = torch.tensor([[1.0, 0.0], [0.3, 0.7], [-2.0, 1.0]])
    scale = 14.0
    expected = torch.zeros(3, 2)
    for b in range(3):
        x = images[b] / images[b].norm()
        for c in range(2):
            per_template = [float(scale * x @ (p / p.norm())) for p in prompts[3 * c : 3 * c + 3]]
            expected[b, c] = sum(per_template) / 3
    logits = similarity_logits(images, prompt_ensemble(prompts, 3, "logits"), scale)
    torch.testing.assert_close(logits, expected)
    # the renormalised ensemble (CONCH's zero-shot) is a different classifier on these prompts
    renormalised = similarity_logits(images, prompt_ensemble(prompts, 3, "embeddings"), scale)
    assert not torch.allclose(renormalised, expected)


class LookupTower(nn.Module):
    """A text tower whose prompt embedding is a learnable row per prompt (token id = prompt index)."""

    def __init__(self, emb: torch.Tensor):
        super().__init__()
        self.emb = nn.Parameter(emb.clone())

    def tokenize(self, prompts):
        return torch.arange(len(prompts)).unsqueeze(1)

    def forward(self, tokens):
        return self.emb[tokens[:, 0]]


class Identity(nn.Module):
    num_features = 2

    def forward(self, x):
        return x


def test_prompt_ft_with_infonce_trains_against_the_first_template():
    prompt_emb = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0], [1.0, 3.0]])  # 2 classes x 2 templates
    model = PromptClassifier(Identity(), num_classes=2, logit_scale=10.0)
    model.attach_prompts(LookupTower(prompt_emb), ["a", "b", "c", "d"], templates=2, ensemble="logits", loss="infonce")
    images = torch.tensor([[1.0, 0.2], [0.1, 1.0], [0.5, 0.5]])
    labels = torch.tensor([0, 1, 1])
    model.train()
    out = model(images)
    anchors = torch.nn.functional.normalize(prompt_emb[[0, 2]], dim=-1)  # first template of each class
    torch.testing.assert_close(out["anchor_emb"], anchors)
    losses = clipit_loss(out, labels, None, lam=1.0)
    torch.testing.assert_close(losses["loss"], symmetric_infonce(images, anchors[labels]))
    losses["loss"].backward()
    assert model.text_tower.emb.grad[[1, 3]].abs().sum() == 0  # only the first template is encoded in training
    model.eval()  # evaluation: the mean of the per-template logits over all templates
    expected = similarity_logits(images, prompt_ensemble(prompt_emb, 2, "logits"), 10.0)
    torch.testing.assert_close(model(images)["logits"], expected)


def test_prompt_loss_is_refused_for_a_method_that_trains_no_prompts():
    with pytest.raises(ConfigError, match=r"methods.unimodal.prompt_loss is for method prompt_ft"):
        load_config(TINY, ["methods.unimodal.prompt_loss=infonce"])


@pytest.mark.slow
def test_prompt_ft_reference_recipe_trains_and_evaluates(tiny_shards, tmp_path):
    proc = cli(
        *train_args(
            tmp_path,
            tiny_shards,
            "methods.prompt_ft={method: prompt_ft, epochs: 0.5, augment: false, prompt_loss: infonce}",
            "clip.ensemble=logits",
            "clip.templates=[a histopathology slide showing CLASSNAME, histopathology image of CLASSNAME]",
            method="prompt_ft",
        )
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "prompt_ft" / "seed-0"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["n"] == 128 and 0 <= metrics["balanced_accuracy"] <= 1
    from safetensors.torch import load_file

    class_emb = load_file(str(run / "best.safetensors"))["class_emb"]
    assert (class_emb.norm(dim=1) < 1 - 1e-4).all()  # mean of unit template embeddings: not renormalised


@pytest.mark.slow
def test_late_fusion_with_a_lora_text_tower_trains_and_predicts_with_it(tiny_shards, tmp_path):
    """late_fusion text_encoder: tower: the reference's FuserModel_ text side carries LoRA; the report is
    encoded by the trained tower in training and at test time (not the frozen embeddings of the shards)."""
    from safetensors.torch import load_file

    proc = cli(
        *train_args(
            tmp_path,
            tiny_shards,
            "methods.late_fusion={method: late_fusion, epochs: 0.5, augment: false, text_encoder: tower}",
            method="late_fusion",
        )
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "late_fusion" / "seed-0"
    best = load_file(str(run / "best.safetensors"))
    tower_lora = [v for k, v in best.items() if k.startswith("text_tower.") and "lora_B" in k]
    assert tower_lora and any(v.abs().sum() > 0 for v in tower_lora)
    assert not [k for k in best if k.startswith("text_tower.") and "lora_" not in k]  # base weights: the CLIP's
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["n"] == 128 and 0 <= metrics["balanced_accuracy"] <= 1


def test_eva_probe_trains_evaluates_and_reports_beside_the_probe(tiny_shards, tmp_path):
    """Method eva_probe (eva's recipe: plain SGD, val accuracy, early stopping) trains on the feature cache
    and gets a Table 1 column of its own next to the reference code's probe."""
    from clipit.results.report import build_report

    sets = [
        "methods.unimodal={method: unimodal, epochs: 1, augment: false}",
        "methods.eva_probe={method: eva_probe, epochs: 2, optimizer: sgd, nesterov: false, momentum: 0.9, "
        "weight_decay: 0.0, schedule: cosine, select: val_acc, patience: 3, augment: false}",
    ]
    for method in ("unimodal", "eva_probe"):
        proc = cli(*train_args(tmp_path, tiny_shards, *sets, method=method))
        assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "runs" / "eva_probe" / "seed-0" / "metrics.json").read_text())
    assert metrics["n"] == 128 and 0 <= metrics["balanced_accuracy"] <= 1
    build_report(tmp_path)
    md = (tmp_path / "report" / "report.md").read_text()
    assert "Unimodal (eva protocol)" in md and "| Vision backbone |" in md
