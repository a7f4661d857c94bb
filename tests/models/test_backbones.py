"""Backbone registry: declared widths, input sizes and normalisation; strict loading of the
checkpoint layouts users bring (plain, eva/Lightning, DINO teacher, DDP, safetensors, raw DINOv2);
hub paths without touching the network; the CONCH vision tower."""

import sys

import pytest
import torch
from safetensors.torch import save_file

from clipit.models import backbones
from clipit.models.backbones import (
    BACKBONES,
    HALF,
    IMAGENET,
    OPENAI,
    BackboneError,
    build_backbone,
    create_backbone,
    fetch_hub_state,
    get_spec,
)


@pytest.fixture(autouse=True)
def no_hub(monkeypatch):
    monkeypatch.setenv("CLIPIT_OFFLINE", "1")
    monkeypatch.delenv("CLIPIT_WEIGHTS", raising=False)


def test_registry_matches_the_paper_backbones():
    uni = get_spec("uni")
    assert (uni.arch, uni.input_size, (uni.mean, uni.std), uni.hub_id) == (
        "vit_large_patch16_224",
        224,
        IMAGENET,
        "hf-hub:MahmoodLab/uni",
    )
    assert uni.kwargs == {"init_values": 1e-5, "dynamic_img_size": True}
    kaiko = {
        "vits16": ("vit_small_patch16_224", 384),
        "vits8": ("vit_small_patch8_224", 384),
        "vitb16": ("vit_base_patch16_224", 768),
        "vitb8": ("vit_base_patch8_224", 768),
        "vitl14": ("vit_large_patch14_reg4_dinov2", 1024),
    }  # as kaiko's hubconf.py builds them
    for name, (arch, dim) in kaiko.items():
        spec = get_spec(f"kaiko-{name}")
        assert (spec.arch, spec.dim, spec.input_size, (spec.mean, spec.std)) == (arch, dim, 224, HALF)
        assert spec.hub_id == f"torch.hub:kaiko-ai/towards_large_pathology_fms:{name}"
        assert spec.kwargs["dynamic_img_size"] is True
    conch = get_spec("conch")
    assert (conch.input_size, (conch.mean, conch.std), conch.dim) == (448, OPENAI, 512)


def test_declared_widths_match_the_architectures():
    with torch.device("meta"):  # full-size models without allocating or initialising them
        for name, spec in BACKBONES.items():
            if spec.arch == "conch" and not _has_conch():
                continue
            assert create_backbone(spec).num_features == spec.dim, name


def test_tiny_variants_run_at_their_input_size():
    for name in ["uni-tiny", "kaiko-vits8-tiny", "kaiko-vitl14-tiny"]:
        model, spec = build_backbone(name)
        assert spec.random_init and spec.hub_id is None
        assert spec.mean == get_spec(name[:-5]).mean
        out = model(torch.randn(2, 3, spec.input_size, spec.input_size))
        assert out.shape == (2, spec.dim) == (2, model.num_features)


def test_timm_models_take_timm_pretrained_config():
    spec = get_spec("timm:vit_small_patch16_224.augreg_in21k")
    assert spec.input_size == 224 and spec.mean == (0.5, 0.5, 0.5) and spec.hub_id.startswith("timm:")
    with pytest.raises(BackboneError, match="unknown timm model"):
        get_spec("timm:not_a_model")
    with pytest.raises(BackboneError, match="unknown backbone"):
        get_spec("resnet9000")


def _state(name="kaiko-vits16-tiny"):
    model, _ = build_backbone(name)
    return model, {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, other):
    x = torch.randn(1, 3, 64, 64)
    model.eval(), other.eval()
    torch.testing.assert_close(model(x), other(x))


@pytest.mark.parametrize("layout", ["plain", "eva", "dino_teacher", "ddp", "safetensors"])
def test_checkpoint_layouts_load_strictly(tmp_path, layout):
    model, state = _state()
    head = {"weight": torch.zeros(4, 32), "bias": torch.zeros(4)}
    if layout == "eva":  # Lightning checkpoint of eva's HeadModule: backbone._model.* + head.*
        ckpt = {
            "state_dict": {
                **{f"backbone._model.{k}": v for k, v in state.items()},
                **{f"head.{k}": v for k, v in head.items()},
            },
            "epoch": 3,
        }
    elif layout == "dino_teacher":
        ckpt = {
            "teacher": {**{f"backbone.{k}": v for k, v in state.items()}, "head.mlp.0.weight": torch.zeros(2)},
            "student": {"backbone.x": torch.zeros(1)},
        }
    elif layout == "ddp":
        ckpt = {f"module.{k}": v for k, v in state.items()}
    else:
        ckpt = state
    path = tmp_path / ("w.safetensors" if layout == "safetensors" else "w.pt")
    save_file(ckpt, str(path)) if layout == "safetensors" else torch.save(ckpt, path)
    loaded, _ = build_backbone("kaiko-vits16-tiny", weights=path)
    _same(model, loaded)


def test_raw_dinov2_checkpoint_is_converted(tmp_path):
    """kaiko's vitl14.pth is in DINOv2's own layout (register_tokens, mask_token, cls in pos_embed)."""
    model, state = _state("kaiko-vitl14-tiny")
    raw = {k: v for k, v in state.items() if k not in ("reg_token", "pos_embed")}
    raw["register_tokens"] = state["reg_token"]
    raw["mask_token"] = torch.zeros(1, 32)
    raw["pos_embed"] = torch.cat([torch.zeros(1, 1, 32), state["pos_embed"]], dim=1)
    torch.save(raw, tmp_path / "vitl14.pth")
    loaded, spec = build_backbone("kaiko-vitl14-tiny", weights=tmp_path / "vitl14.pth")
    x = torch.randn(1, 3, spec.input_size, spec.input_size)
    torch.testing.assert_close(model.eval()(x), loaded.eval()(x))


def test_mismatches_are_one_clear_error(tmp_path):
    _, state = _state()
    missing = {k: v for k, v in state.items() if not k.startswith("blocks.1.")}
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(
        BackboneError,
        match=r"missing.pt: does not fit backbone 'kaiko-vits16-tiny' \(\d+ tensors expected, \d+ missing",
    ):
        build_backbone("kaiko-vits16-tiny", weights=tmp_path / "missing.pt")
    _, other = _state("demo-vit-tiny")  # another width
    torch.save(other, tmp_path / "other.pt")
    with pytest.raises(BackboneError, match="of another shape"):
        build_backbone("kaiko-vits16-tiny", weights=tmp_path / "other.pt")
    with pytest.raises(BackboneError, match="not found"):
        build_backbone("kaiko-vits16-tiny", weights=tmp_path / "absent.pt")


def test_pretrained_backbone_without_weights_names_the_weights_file(tmp_path, monkeypatch):
    with pytest.raises(BackboneError, match=r"no weights for 'kaiko-vits16'.*CLIPIT_OFFLINE=1.*weights.example.yaml"):
        build_backbone("kaiko-vits16")
    wf = tmp_path / "weights.yaml"
    wf.write_text("uni: uni.bin\n")
    monkeypatch.setenv("CLIPIT_WEIGHTS", str(wf))
    with pytest.raises(BackboneError, match=f"add `kaiko-vits16: /path/to/checkpoint` to the weights file {wf}"):
        build_backbone("kaiko-vits16")


def test_hub_failure_is_actionable(monkeypatch):
    monkeypatch.delenv("CLIPIT_OFFLINE")

    def no_network(spec, hub_id, image_size=None):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(backbones, "fetch_hub_state", no_network)
    with pytest.raises(
        BackboneError,
        match=r"could not fetch 'timm:vit_tiny_patch16_224' from timm:vit_tiny.*OSError"
        r".*weights file",
    ):
        build_backbone("timm:vit_tiny_patch16_224")


def test_hub_ids_reach_the_right_loaders(monkeypatch):
    calls = []
    tiny, _ = build_backbone("kaiko-vits16-tiny")

    def fake_hub_load(repo, entry, **kwargs):
        calls.append((repo, entry, kwargs))
        return tiny

    monkeypatch.setattr(torch.hub, "load", fake_hub_load)
    monkeypatch.setenv("CLIPIT_TRUST_HUB", "1")  # torch.hub runs the repository's code: an explicit opt-in
    state = fetch_hub_state(get_spec("kaiko-vits16"), get_spec("kaiko-vits16").hub_id)
    assert calls == [("kaiko-ai/towards_large_pathology_fms", "vits16", {"trust_repo": True})]
    assert state.keys() == tiny.state_dict().keys()


def _has_conch():
    try:
        import conch.open_clip_custom  # noqa: F401
    except ImportError:
        return False
    return True


def test_conch_without_conch_fork_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "conch", None)
    monkeypatch.setitem(sys.modules, "conch.open_clip_custom", None)
    with pytest.raises(BackboneError, match=r"pip install conch-fork==0\.1\.0"):
        build_backbone("conch-tiny")


@pytest.mark.skipif(not _has_conch(), reason="conch-fork not installed")
def test_conch_vision_tower_loads_a_full_coca_checkpoint(tmp_path):
    model, spec = build_backbone("conch-tiny")
    out = model(torch.randn(2, 3, spec.input_size, spec.input_size))
    assert out.shape == (2, 512) and torch.allclose(out.norm(dim=1), torch.ones(2))
    full = {f"visual.{k}": v for k, v in model.state_dict().items()}
    full |= {
        "visual.attn_pool_caption.query": torch.zeros(4, 64),
        "visual.ln_caption.weight": torch.ones(64),
        "text.token_embedding.weight": torch.zeros(3, 8),
        "logit_scale": torch.ones([]),
    }
    torch.save(full, tmp_path / "pytorch_model.bin")
    loaded, _ = build_backbone("conch-tiny", weights=tmp_path / "pytorch_model.bin")
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(model.eval()(x), loaded.eval()(x))
