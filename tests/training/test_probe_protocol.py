"""Probe protocols (issue: paper fidelity): an imported eva-style probe head, early stopping, and the
per-parameter-group learning rates of full fine-tuning."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from clipit.config import LoraConfig
from clipit.models.clipit import ClipItModel, param_groups, prepare_finetune
from clipit_testing import cli, train_args


def run_dir(out: Path, method: str = "unimodal", seed: int = 0) -> Path:
    return out / "runs" / method / f"seed-{seed}"


@pytest.fixture(scope="module")
def trained_probe(tiny_demo):
    """The tiny config's unimodal probe, seed 0: the session's demo trained it (shared: read only)."""
    out, _ = tiny_demo
    assert (run_dir(out) / "train_summary.json").exists()
    return out


def test_an_imported_eva_checkpoint_reproduces_the_probe(trained_probe, tiny_shards, tmp_path):
    best = load_file(str(run_dir(trained_probe) / "best.safetensors"))
    # eva's HeadModule checkpoint: a Lightning dict whose state_dict holds head.weight / head.bias
    ckpt = tmp_path / "eva-best.ckpt"
    torch.save(
        {
            "state_dict": {"head.weight": best["head.weight"], "head.bias": best["head.bias"]},
            "epoch": 7,
            "global_step": 448,
            "pytorch-lightning_version": "2.4.0",
        },
        ckpt,
    )
    out = tmp_path / "imported"
    proc = cli(*train_args(out, tiny_shards, f"methods.unimodal.head_from={ckpt}", method="unimodal"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "head imported from" in proc.stdout
    summary = json.loads((run_dir(out) / "train_summary.json").read_text())
    assert summary["steps"] == 0 and summary["imported"]["head_from"] == str(ckpt)
    want = np.load(run_dir(trained_probe) / "predictions-test.npz")
    got = np.load(run_dir(out) / "predictions-test.npz")
    assert (got["keys"] == want["keys"]).all()
    np.testing.assert_allclose(got["logits"], want["logits"], rtol=0, atol=1e-5)  # same backbone, same head


def test_a_checkpoint_that_needs_code_to_load_is_refused(tiny_shards, tmp_path):
    bad = tmp_path / "probe.ckpt"
    torch.save({"state_dict": {"head.weight": torch.zeros(2, 8)}, "callback": Path("x")}, bad)  # a pickled object
    out = tmp_path / "run"
    proc = cli(*train_args(out, tiny_shards, f"methods.unimodal.head_from={bad}", method="unimodal"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "not loadable as plain tensors" in proc.stderr and "safetensors" in proc.stderr
    assert not (run_dir(out) / "best.json").exists()


def test_patience_stops_a_run_that_does_not_improve(tiny_shards, tmp_path):
    # lr 1e-12: the val balanced accuracy never beats the first validation, so after 2 more the run stops
    proc = cli(
        *train_args(
            tmp_path,
            tiny_shards,
            "methods.unimodal.lr=1e-12",
            "methods.unimodal.patience=2",
            "methods.unimodal.evals_per_epoch=4",
            "methods.unimodal.batch_size=16",
            method="unimodal",
        )
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir(tmp_path) / "train_summary.json").read_text())
    every = 256 // 16 // 4
    assert summary["best_step"] == every and summary["stopped_early_at_step"] == 3 * every
    assert summary["best_val"]["balanced_accuracy"] >= 0


class Backbone(torch.nn.Module):
    num_features = 4

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.body(x)


def test_full_finetuning_gives_pretrained_weights_their_own_lr():
    model = ClipItModel(Backbone(), num_classes=2, text_dim=4)
    prepare_finetune(model, "full", LoraConfig(), warm_head=True)
    groups = param_groups(model, lr=1e-3, pretrained_lr=1e-5, warm_head=True)
    by_lr = {g["lr"]: {id(p) for p in g["params"]} for g in groups}
    pretrained = {id(p) for p in [*model.backbone.parameters(), *model.head.parameters()]}
    fresh = {id(p) for m in (model.proj, model.text_head, model.fuse) for p in m.parameters()}
    assert by_lr == {1e-5: pretrained, 1e-3: fresh}
    assert len(param_groups(model, lr=1e-3, pretrained_lr=None, warm_head=True)) == 1  # one lr: one group
