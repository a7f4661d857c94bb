"""Any open_clip model as the pairing model: a local weights file, a hub weights ID, strict loading."""

import pytest
import torch
from PIL import Image

from clipit.io import sha256_file

open_clip = pytest.importorskip("open_clip")

from clipit.pairing import encoders as models  # noqa: E402
from clipit.pairing.demo_clip import register_demo_clip  # noqa: E402
from clipit.pairing.encoders import PairingModelError, build_pairing_model  # noqa: E402


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Random weights of a small registered open_clip architecture, saved as a local file."""
    from safetensors.torch import save_file

    arch = register_demo_clip()
    torch.manual_seed(0)
    model = open_clip.create_model(arch, pretrained=None).eval()
    path = tmp_path_factory.mktemp("oc") / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return arch, model, path


def test_local_file(weights):
    arch, reference, path = weights
    pm = build_pairing_model(f"open_clip:{arch}", str(path), device="cpu")
    assert pm.identity == {"model": f"open_clip:{arch}", "checkpoint": str(path), "sha256": sha256_file(path)}
    image = pm.preprocess(Image.new("RGB", (64, 64), (120, 40, 200)))[None]
    with torch.no_grad():
        want = torch.nn.functional.normalize(reference.encode_image(image), dim=-1)
    torch.testing.assert_close(pm.encode_images(image), want)
    assert pm.encode_texts(["tumor", "stroma"]).shape == (2, 512)


def test_hub_weights_id(weights, monkeypatch):
    arch, _, path = weights
    calls = []
    monkeypatch.setattr(models, "_hub_download", lambda repo, filename=None: calls.append(repo) or str(path))
    pm = build_pairing_model(f"open_clip:{arch}", "hf-hub:someone/quilt-like", device="cpu")
    assert calls == ["someone/quilt-like"] and pm.identity["checkpoint"] == "hf-hub:someone/quilt-like"

    def offline(repo, filename=None):
        raise OSError("cannot reach huggingface.co\nsecond line")

    monkeypatch.setattr(models, "_hub_download", offline)
    with pytest.raises(PairingModelError, match=r"^hf-hub:someone/quilt-like: cannot download weights") as err:
        build_pairing_model(f"open_clip:{arch}", "hf-hub:someone/quilt-like", device="cpu")
    assert "\n" not in str(err.value)


def test_hub_schema_model_name_is_passed_to_open_clip(monkeypatch):
    seen = {}

    def fake_create(name, pretrained=None):
        seen["name"], seen["pretrained"] = name, pretrained
        raise RuntimeError("Failed initial config/weights load from HF Hub")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", fake_create)
    with pytest.raises(PairingModelError, match="does not fit open_clip:hf-hub:org/repo"):
        build_pairing_model("open_clip:hf-hub:org/repo", None, device="cpu")
    assert seen == {"name": "hf-hub:org/repo", "pretrained": None}
    with pytest.raises(PairingModelError, match="brings its own weights"):
        build_pairing_model("open_clip:hf-hub:org/repo", "x.bin", device="cpu")


def test_wrong_or_missing_weights(weights, tmp_path):
    arch, _, _ = weights
    torch.save({"visual.proj": torch.zeros(3)}, tmp_path / "other.bin")
    with pytest.raises(PairingModelError, match=r"other.bin: does not fit open_clip:clipit-demo-clip") as err:
        build_pairing_model(f"open_clip:{arch}", str(tmp_path / "other.bin"), device="cpu")
    assert "\n" not in str(err.value)
    with pytest.raises(PairingModelError, match="weights file for open_clip"):
        build_pairing_model(f"open_clip:{arch}", str(tmp_path / "missing.bin"), device="cpu")
    with pytest.raises(PairingModelError, match="unknown open_clip architecture"):
        build_pairing_model("open_clip:NoSuchNet", str(tmp_path / "other.bin"), device="cpu")
    with pytest.raises(PairingModelError, match="unknown pairing model"):
        build_pairing_model("clip-from-nowhere", None, device="cpu")
