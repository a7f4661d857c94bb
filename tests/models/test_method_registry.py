"""A method registered by this file alone (clipit/methods.py) goes through every stage: the config
accepts it, --help lists it, `clipit train` trains and evaluates it, `clipit export` writes it (or
refuses it with one line when it needs the report at test time) and `clipit report` shows it."""

import json

import pytest
import torch
from torch import nn

from clipit.cli_flags import valid_choices
from clipit.config import load_config
from clipit.errors import ConfigError
from clipit.evaluation.export import load_exported
from clipit.methods import MethodSpec, ModelParts, method_names, register_method, unregister_method
from clipit.models.clipit import BackboneModel
from clipit.models.factory import build_classifier
from clipit_testing import ROOT, TINY, cli_main, shard_copy, train_args, with_shards


class NormProbe(BackboneModel):
    """The toy method: frozen backbone -> LayerNorm -> linear head."""

    def __init__(self, backbone: nn.Module, num_classes: int, text_dim: int = 0):
        super().__init__(backbone)
        self.norm = nn.LayerNorm(backbone.num_features + text_dim)
        self.head = nn.Linear(backbone.num_features + text_dim, num_classes)

    def forward(self, images: torch.Tensor, text_emb: torch.Tensor | None = None) -> dict:
        return self.from_features(self.features(images), text_emb)

    def from_features(self, feats: torch.Tensor, text_emb: torch.Tensor | None = None) -> dict:
        return {"logits": self.head(self.norm(feats))}


class NormFusion(NormProbe):
    """Its variant that reads the paired report at test time."""

    def from_features(self, feats: torch.Tensor, text_emb: torch.Tensor | None = None) -> dict:
        return {"logits": self.head(self.norm(torch.cat([feats, text_emb.to(feats.dtype)], dim=1)))}


def build_norm_probe(parts: ModelParts) -> nn.Module:
    return NormProbe(parts.backbone, parts.num_classes)


def build_norm_fusion(parts: ModelParts) -> nn.Module:
    return NormFusion(parts.backbone, parts.num_classes, parts.text_dim)


TOY = "norm_probe"
TOY_TEXT = "norm_fusion"
LABEL = "toy norm probe"


@pytest.fixture(scope="module", autouse=True)
def at_the_repository_root():
    """The CLI runs in this process, and the shipped configs' relative paths are the repository root's."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        yield


@pytest.fixture(scope="module")
def toy_methods():
    register_method(name=TOY, label=LABEL, group="vision", finetune_auto="frozen", marker="X")(build_norm_probe)
    register_method(name=TOY_TEXT, label="toy norm fusion", group="multimodal", text_at_test=True, reads_reports=True)(
        build_norm_fusion
    )
    yield
    unregister_method(TOY)
    unregister_method(TOY_TEXT)


def toy_sets(shards: list[str]) -> list[str]:
    settings = "epochs: 1, lr: 3.0e-3, augment: false, select: val_bacc"
    # named as their kinds: a method named otherwise is reported as a variant of its kind
    return [f"methods.{TOY}={{method: {TOY}, {settings}}}", f"methods.{TOY_TEXT}={{method: {TOY_TEXT}, {settings}}}"]


def test_an_unregistered_method_is_one_line_naming_the_key_and_the_choices(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, [f"methods.toy={{method: {TOY}}}"])
    message = str(err.value)
    assert message.startswith(f"{TINY}: methods.toy.method = '{TOY}' is not one of [")
    assert "'clipit'" in message and "\n" not in message


def test_a_registered_method_is_valid_and_listed(toy_methods, tmp_path):
    cfg = load_config(TINY, [f"methods.toy={{method: {TOY}}}"])
    assert cfg.methods["toy"].method == TOY and TOY in method_names()
    assert TOY in valid_choices().splitlines()[0]
    with pytest.raises(
        ConfigError, match=f"methods.toy.text_encoder: tower is for method clipit or late_fusion \\(got '{TOY}'\\)"
    ):
        load_config(TINY, [f"methods.toy={{method: {TOY}, text_encoder: tower, lam: 1.0}}"])


@pytest.fixture(scope="module")
def trained(toy_methods, tiny_shards, tmp_path_factory):
    """Both toy methods trained and evaluated by `clipit train` (in this process: the registry is its own)."""
    out = tmp_path_factory.mktemp("toy")
    shards = with_shards(tiny_shards, shard_copy(tiny_shards, out))  # the feature cache writes into the set
    for method in (TOY, TOY_TEXT):
        assert cli_main(train_args(out, [*shards, *toy_sets(shards)], method=method, seed=0)) == 0
    return out


def test_a_toy_method_trains_evaluates_exports_and_is_reported(trained, capsys):
    run = trained / "runs" / TOY / "seed-0"
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["steps"] > 0 and "feature_cache" in summary  # frozen by its spec, so trained on features
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= metrics["balanced_accuracy"] <= 1.0

    assert cli_main(["export", str(run), str(trained / "export")]) == 0
    model, _, config = load_exported(trained / "export")
    assert config["method"] == TOY and isinstance(model, NormProbe)
    assert torch.isfinite(model(torch.rand(2, 3, 64, 64))["logits"]).all()

    capsys.readouterr()
    assert cli_main(["report", str(trained / "runs"), "--out", str(trained / "report"), "--no-plots"]) == 0
    report = (trained / "report" / "report.md").read_text()
    baselines = report.split("## Multimodal and CLIP-based baselines")[1].split("##")[0]
    assert f"| {LABEL} |" in baselines and "| toy norm fusion |" in baselines  # by their spec's labels
    rows = (trained / "report" / "runs.csv").read_text()
    assert f",{TOY},{TOY},0," in rows and f",{TOY_TEXT},{TOY_TEXT},0," in rows


def test_a_toy_method_that_reads_the_report_at_test_time_is_refused_export(trained, capsys):
    capsys.readouterr()
    run = trained / "runs" / TOY_TEXT / "seed-0"
    assert cli_main(["export", str(run), str(trained / "export-text")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("clipit: error: ")]  # the stage lines come before
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in "\n".join(lines)
    assert f"method '{TOY_TEXT}' uses the paired report at test time" in errors[0]
    assert TOY in errors[0] and not (trained / "export-text" / "config.json").exists()


def test_a_builder_entry_point_that_does_not_resolve_is_one_line_naming_the_method():
    register_method(MethodSpec(name="lost", builder="clipit.models.nowhere:build_lost", label="lost"))
    try:
        with pytest.raises(ConfigError, match="method lost: its builder 'clipit.models.nowhere:build_lost' does not"):
            build_classifier("lost", None, 2, 16, 1)
    finally:
        unregister_method("lost")
