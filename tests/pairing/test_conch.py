"""CONCH through conch-fork: tokenizer, preprocessing, strict weight loading, hub IDs.

Fast tests use the real CoCa class with a shrunk config (same structure, tiny widths) and random weights
saved here; the full conch_ViT-B-16 round trip (395M parameters, ~30 s) is marked slow."""

import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

with warnings.catch_warnings():  # conch imports timm.models.layers (deprecated path)
    warnings.simplefilter("ignore", FutureWarning)
    pytest.importorskip("conch.open_clip_custom")

from pairing.fakes import shrunk_conch_config as shrunk_config

from clipit.pairing import encoders as models
from clipit.pairing.encoders import PairingModelError, build_pairing_model, load_conch


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A random shrunk CoCa and its state dict saved as pytorch_model.bin."""
    torch.manual_seed(0)
    cfg = shrunk_config()
    model = models._import_conch().CoCa(**cfg).eval()
    path = tmp_path_factory.mktemp("conch") / "pytorch_model.bin"
    torch.save(model.state_dict(), path)
    return cfg, model, path


def test_packaged_config_is_conch_vit_b16():
    cfg = models.conch_config()
    assert cfg["embed_dim"] == 512 and cfg["vision_cfg"]["image_size"] == 448
    assert cfg["text_cfg"]["context_length"] == 128 and cfg["text_cfg"]["vocab_size"] == 32007


def test_tokenizer_pads_to_127_then_appends_one_pad():
    tokenize = models.conch_tokenizer()
    tok = models._import_conch().get_tokenizer()
    ids = tokenize(["an H&E image of tumor.", "carcinoma " * 400])
    assert ids.shape == (2, 128) and ids.dtype == torch.long
    assert (ids[:, 0] == tok.bos_token_id).all() and (ids[:, 127] == tok.pad_token_id).all()
    assert ids[1, 126] == tok.eos_token_id  # truncated, but still ends with <end_of_text>
    short = tok("an H&E image of tumor.")["input_ids"]
    assert ids[0, : len(short)].tolist() == short and (ids[0, len(short) :] == tok.pad_token_id).all()


def test_preprocess_is_448_bicubic_centre_crop_with_openai_stats():
    pre = models.conch_preprocess()
    x = pre(Image.new("RGB", (96, 120), (255, 0, 128)))
    assert x.shape == (3, 448, 448)
    mean, std = (
        np.array(models._import_conch().OPENAI_DATASET_MEAN),
        np.array(models._import_conch().OPENAI_DATASET_STD),
    )
    expected = (np.array([255, 0, 128]) / 255 - mean) / std
    np.testing.assert_allclose(x.mean(dim=(1, 2)).numpy(), expected, atol=1e-2)


def test_load_encode_matches_the_conch_model(saved):
    cfg, reference, path = saved
    pm = load_conch(path, model_cfg=cfg)
    assert pm.identity["model"] == "conch:conch_ViT-B-16" and len(pm.identity["sha256"]) == 64
    images = torch.stack([pm.preprocess(Image.new("RGB", (96, 96), (i * 40, 100, 200))) for i in range(3)])
    feats = pm.encode_images(images)
    with torch.no_grad():
        want = reference.encode_image(images, proj_contrast=True, normalize=True)
    torch.testing.assert_close(feats, want)
    assert torch.allclose(feats.norm(dim=1), torch.ones(3))
    texts = pm.encode_texts(["tumor", "normal lymph node tissue"])
    with torch.no_grad():
        torch.testing.assert_close(texts, reference.encode_text(pm.tokenize(["tumor", "normal lymph node tissue"])))
    assert texts.shape == (2, 32)


def test_folder_and_safetensors_checkpoints(saved, tmp_path):
    from safetensors.torch import save_file

    cfg, reference, path = saved
    assert load_conch(path.parent, model_cfg=cfg).identity["sha256"]  # folder holding pytorch_model.bin
    st = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(st))
    load_conch(st, model_cfg=cfg)


@pytest.mark.parametrize(
    "damage, words",
    [
        ("drop", "1 missing (e.g. logit_scale)"),
        ("extra", "1 unexpected (e.g. visual.extra.weight)"),
        ("shape", "of another shape (e.g. logit_scale (2,) vs ())"),
    ],
)
def test_strict_load_names_the_file_and_what_does_not_fit(saved, tmp_path, damage, words):
    cfg, _, path = saved
    state = torch.load(path, weights_only=True)
    if damage == "drop":
        del state["logit_scale"]
    elif damage == "extra":
        state["visual.extra.weight"] = torch.zeros(2)
    else:
        state["logit_scale"] = torch.zeros(2)
    bad = tmp_path / "bad.bin"
    torch.save(state, bad)
    with pytest.raises(PairingModelError) as err:
        load_conch(bad, model_cfg=cfg)
    msg = str(err.value)
    assert msg.startswith(f"{bad}: does not fit CONCH conch_ViT-B-16 weights") and words in msg and "\n" not in msg
    assert "set pairing.checkpoint" in msg


def test_unreadable_and_missing_weights(tmp_path):
    junk = tmp_path / "pytorch_model.bin"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(PairingModelError, match="not a readable weights file"):
        load_conch(junk)
    with pytest.raises(PairingModelError, match="CONCH weights not found"):
        load_conch(tmp_path / "nope.bin")
    with pytest.raises(PairingModelError, match="needs pairing.checkpoint"):
        build_pairing_model("conch", None, device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PairingModelError, match="folder holds no pytorch_model.bin"):
        load_conch(tmp_path / "empty")


def test_hub_id_downloads_pytorch_model_bin(saved, monkeypatch):
    cfg, _, path = saved
    calls = []
    monkeypatch.setattr(
        models, "_hub_download", lambda repo, filename=None: calls.append((repo, filename)) or str(path)
    )
    pm = load_conch("hf_hub:MahmoodLab/conch", model_cfg=cfg)
    assert calls == [("MahmoodLab/conch", "pytorch_model.bin")]
    assert pm.identity["checkpoint"] == "hf_hub:MahmoodLab/conch"

    def offline(repo, filename=None):
        raise OSError("We couldn't connect to 'https://huggingface.co'\nmore lines")

    monkeypatch.setattr(models, "_hub_download", offline)
    with pytest.raises(PairingModelError) as err:
        load_conch("hf_hub:MahmoodLab/conch", model_cfg=cfg)
    assert "\n" not in str(err.value) and str(err.value).startswith("hf_hub:MahmoodLab/conch: cannot download")


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "conch.open_clip_custom", None)
    with pytest.raises(PairingModelError, match=r"pip install 'clipit\[conch\]'"):
        load_conch("whatever.bin")


@pytest.mark.slow
def test_full_conch_architecture_round_trip(tmp_path):
    """The real conch_ViT-B-16 (395M parameters) with random weights: saved, strictly loaded, encoded."""
    torch.manual_seed(0)
    model = models._import_conch().CoCa(**models.conch_config()).eval()
    path = tmp_path / "pytorch_model.bin"
    torch.save(model.state_dict(), path)
    try:
        pm = build_pairing_model("conch", str(path), device="cpu")
    finally:
        path.unlink()  # 1.6 GB: do not leave it to pytest's tmp retention
    image = pm.preprocess(Image.new("RGB", (96, 96), (200, 80, 160)))[None]
    feats = pm.encode_images(image)
    with torch.no_grad():
        torch.testing.assert_close(feats, model.encode_image(image, proj_contrast=True, normalize=True))
    assert feats.shape == (1, 512) and pm.encode_texts(["an H&E image of tumor."]).shape == (1, 512)
