"""Pairing models behind one interface: preprocess, tokenize, encode_images, encode_texts, identity.

Embeddings come back L2-normalised in the model's joint image-text space (CONCH: 512-d). Registry
names (config `pairing.model`):

* ``conch``: CONCH (CoCa ViT-B/16 at 448 px). Architecture, tokenizer and transform come from the
  ``conch-fork`` package (CC BY-NC-ND 4.0: installed as the optional extra ``clipit[conch]``, used as
  is, never vendored). Weights: ``pairing.checkpoint`` = a local ``pytorch_model.bin`` (or
  ``.safetensors``, or a folder holding one) or ``hf_hub:MahmoodLab/conch`` (gated; needs
  ``huggingface-cli login`` and network). Loading is strict: any missing, unexpected or mis-shaped
  tensor is an error (CONCH's own loader uses ``strict=False`` and would pair with random weights).
* ``open_clip:<arch>``: any open_clip architecture with weights from a local file or
  ``hf-hub:<repo>`` (weights file from the hub, architecture from open_clip); or
  ``open_clip:hf-hub:<repo>`` / ``open_clip:local-dir:<dir>``: config and weights both from there.
* ``hf-clip:<name>``: a transformers-format CLIP (PLIP; PathCLIP saved with save_pretrained) from a local
  folder (config.json + model.safetensors); clipit/pairing/hf_clip.py.
* ``demo-clip``: the small CLIP that `clipit demo` trains (clipit/pairing/demo_clip.py).
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from clipit.errors import ClipitError, one_line
from clipit.io import sha256_file
from clipit.pairing.search import l2_normalize
from clipit.state_dict import load_strict

CONCH_ARCH = "conch_ViT-B-16"
CONCH_HUB_FILE = "pytorch_model.bin"
CONCH_CONTEXT = 128  # tokens: 127 from the tokenizer + 1 pad that the CLS embedding replaces
CONCH_HINT = (
    "download pytorch_model.bin from https://huggingface.co/MahmoodLab/conch (gated: accept the terms) "
    "and set pairing.checkpoint in your config to its path"
)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Non-persistent buffers that older checkpoints may carry; they are rebuilt by the model, never loaded.
_IGNORED_UNEXPECTED = ("text.attn_mask", "text_decoder.attn_mask")


class PairingModelError(ClipitError):
    """Weights for a pairing model are missing or do not fit (one line, names what to fix)."""


class PairingModel:
    """An open_clip-style CLIP: `model.encode_image` / `model.encode_text` plus a tokenizer."""

    def __init__(
        self,
        name: str,
        model: torch.nn.Module,
        preprocess: Callable,
        tokenizer: Callable,
        identity: dict,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
    ):
        if precision not in PRECISIONS:
            raise PairingModelError(f"pairing.precision {precision!r} is not one of {sorted(PRECISIONS)}")
        self.name = name
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.preprocess = preprocess  # PIL image -> CHW float tensor
        self.tokenizer = tokenizer  # list[str] -> LongTensor [B, context]
        self.precision = precision
        # what made the embeddings: caches and shard manifests record it (precision only when not fp32,
        # so fp32 caches made before the option existed stay valid)
        self.identity = dict(identity, **({"precision": precision} if precision != "fp32" else {}))

    def image_encoder_parameters(self) -> int:
        """Parameters that run to embed one image (the `visual` tower of open_clip-style models)."""
        tower = getattr(self.model, "visual", None) or getattr(self.model, "vision_model", None) or self.model
        return sum(p.numel() for p in tower.parameters())

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts)

    def _autocast(self):
        dtype = PRECISIONS[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def _image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)

    def _text_features(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] preprocessed images -> [B, D] unit vectors, left on the model's device (no host sync)."""
        with self._autocast():
            feats = self._image_features(images.to(self.device, non_blocking=True))
        return l2_normalize(feats.float())

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        with self._autocast():
            feats = self._text_features(self.tokenize(texts).to(self.device, non_blocking=True))
        return l2_normalize(feats.float())

    @property
    def embed_dim(self) -> int:
        return int(self.encode_texts(["x"]).shape[-1])


class ConchPairingModel(PairingModel):
    """CONCH: the contrastive (attention-pooled, projected) image embedding and the CLS text embedding."""

    def _image_features(self, images):
        return self.model.encode_image(images, proj_contrast=True, normalize=True)

    def _text_features(self, tokens):
        return self.model.encode_text(tokens, normalize=True)


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# ------------------------------------------------------------------------------------------------ demo


def load_demo_clip(
    checkpoint: str | Path | None, device: str | torch.device = "cpu", precision: str = "fp32"
) -> PairingModel:
    from clipit.pairing import demo_clip

    if checkpoint is None or not Path(checkpoint).is_file():
        raise PairingModelError(
            f"demo-clip checkpoint {checkpoint} not found; run `clipit demo` (it trains one) or set pairing.checkpoint"
        )
    model, preprocess, tokenizer = demo_clip.load_demo_clip(Path(checkpoint))
    identity = {"model": "demo-clip", "sha256": sha256_file(checkpoint)}
    return PairingModel("demo-clip", model, preprocess, tokenizer, identity, device, precision)


# ------------------------------------------------------------------------------------------- open_clip


def _hub_download(repo_id: str, filename: str | None = None) -> str:
    """A weights file from the Hugging Face hub (open_clip's own choice of file when `filename` is None)."""
    if filename is None:
        from open_clip.pretrained import download_pretrained_from_hf

        return download_pretrained_from_hf(repo_id)
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo_id, filename=filename)


def load_open_clip(
    arch: str, checkpoint: str | Path | None, device: str | torch.device = "cpu", precision: str = "fp32"
) -> PairingModel:
    """Any open_clip model (QuiltNet, PLIP-style); see the module docstring for the accepted forms."""
    import open_clip

    name = f"open_clip:{arch}"
    schema = arch.startswith(("hf-hub:", "local-dir:"))
    if schema:  # config and weights from the hub repo / folder
        if checkpoint:
            raise PairingModelError(f"{name} brings its own weights; remove pairing.checkpoint ({checkpoint})")
        model_name, weights, source = arch, None, arch
    else:
        if arch not in open_clip.list_models():
            raise PairingModelError(
                f"unknown open_clip architecture {arch!r}; set pairing.model to open_clip:<one of "
                f"open_clip.list_models()> or open_clip:hf-hub:<repo>"
            )
        if not checkpoint:
            raise PairingModelError(f"{name} needs pairing.checkpoint: a local weights file or hf-hub:<repo>")
        source = str(checkpoint)
        if source.startswith("hf-hub:"):
            try:
                weights = _hub_download(source[len("hf-hub:") :])
            except Exception as err:  # offline, gated, no such repo: all end the same way for the user
                raise PairingModelError(
                    f"{source}: cannot download weights for {name} ({one_line(err)}); download "
                    "them and set pairing.checkpoint to the local file"
                ) from None
        else:
            weights = source
            if not Path(weights).is_file():
                raise PairingModelError(f"{weights}: weights file for {name} not found; fix pairing.checkpoint")
        model_name = arch
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=weights)
        tokenizer = open_clip.get_tokenizer(model_name)
    except (RuntimeError, ValueError, KeyError, OSError) as err:  # strict load: missing/unexpected keys, shapes
        raise PairingModelError(
            f"{weights or source}: does not fit {name} ({one_line(err)}); fix pairing.checkpoint or pairing.model"
        ) from None
    except Exception as err:  # hub errors for the schema forms
        raise PairingModelError(
            f"{source}: cannot load {name} ({one_line(err)}); check the name and your network"
        ) from None
    identity = {"model": name, "checkpoint": source}
    if weights and Path(weights).is_file():
        identity["sha256"] = sha256_file(weights)
    return PairingModel(name, model, preprocess, tokenizer, identity, device, precision)


# ----------------------------------------------------------------------------------------------- CONCH


def _import_conch():
    try:
        with warnings.catch_warnings():  # conch imports timm.models.layers (deprecated path)
            warnings.simplefilter("ignore", FutureWarning)
            import conch.open_clip_custom as conch
    except ImportError as err:
        raise PairingModelError(
            f"pairing.model conch needs the conch-fork package ({one_line(err)}); pip install 'clipit[conch]'"
        ) from None
    return conch


def conch_config() -> dict:
    """The CoCa config that conch-fork ships for conch_ViT-B-16 (without its `custom_text` flag)."""
    from conch.open_clip_custom.factory import CFG_DIR

    cfg = json.loads((Path(CFG_DIR) / f"{CONCH_ARCH}.json").read_text())
    cfg.pop("custom_text", None)
    return cfg


def conch_tokenizer(hf_tokenizer=None) -> Callable[[list[str]], torch.Tensor]:
    """CONCH's tokenize() without `batch_encode_plus` (gone in transformers 5): pad/truncate to 127 tokens
    with <start_of_text>/<end_of_text>, then append one <pad> (the CLS slot) -> LongTensor [B, 128]."""
    tok = hf_tokenizer or _import_conch().get_tokenizer()

    def tokenize(texts: list[str]) -> torch.Tensor:
        ids = tok(
            list(texts),
            max_length=CONCH_CONTEXT - 1,
            add_special_tokens=True,
            return_token_type_ids=False,
            truncation=True,
            padding="max_length",
            return_tensors="pt",
        )["input_ids"]
        return torch.nn.functional.pad(ids, (0, 1), value=tok.pad_token_id)

    return tokenize


def conch_preprocess(image_size: int = 448):
    """Resize shorter side (bicubic) + centre crop + RGB + ToTensor + OpenAI CLIP mean/std: CONCH's transform."""
    conch = _import_conch()
    from conch.open_clip_custom.transform import image_transform

    return image_transform(image_size, mean=conch.OPENAI_DATASET_MEAN, std=conch.OPENAI_DATASET_STD)


def resolve_conch_weights(checkpoint: str | Path | None) -> Path:
    """A local CONCH weights file from pairing.checkpoint (a file, a folder, or hf_hub:/hf-hub:<repo>)."""
    if not checkpoint:
        raise PairingModelError(
            f"pairing.model conch needs pairing.checkpoint; {CONCH_HINT} (or write hf_hub:MahmoodLab/conch)"
        )
    source = str(checkpoint)
    for prefix in ("hf_hub:", "hf-hub:"):
        if source.startswith(prefix):
            try:
                return Path(_hub_download(source[len(prefix) :], CONCH_HUB_FILE))
            except Exception as err:  # offline, gated or missing repo
                raise PairingModelError(
                    f"{source}: cannot download {CONCH_HUB_FILE} ({one_line(err)}); {CONCH_HINT}"
                ) from None
    path = Path(source).expanduser()
    if path.is_dir():
        found = [path / n for n in (CONCH_HUB_FILE, "model.safetensors", "pytorch_model.pt") if (path / n).is_file()]
        if not found:
            raise PairingModelError(f"{path}: folder holds no {CONCH_HUB_FILE} or model.safetensors; {CONCH_HINT}")
        path = found[0]
    if not path.is_file():
        raise PairingModelError(f"{path}: CONCH weights not found; {CONCH_HINT}")
    return path


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            try:  # zip checkpoints can be memory-mapped (no second copy of 1.5 GB)
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as err:
                if "mmap" not in str(err):
                    raise
                state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise PairingModelError(f"{path}: not a readable weights file ({one_line(err)}); {CONCH_HINT}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state:
        raise PairingModelError(f"{path}: holds no state dict of tensors; {CONCH_HINT}")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def load_conch(
    checkpoint: str | Path | None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    model_cfg: dict | None = None,
) -> ConchPairingModel:
    """CONCH from conch-fork's CoCa and strictly loaded weights. `model_cfg` replaces the packaged
    conch_ViT-B-16 config (tests use a shrunk one; the identity then records it)."""
    conch = _import_conch()
    path = resolve_conch_weights(checkpoint)
    state = read_state_dict(path)
    cfg = model_cfg or conch_config()
    model = conch.CoCa(**cfg)
    load_strict(model, state, path, f"CONCH {CONCH_ARCH} weights", CONCH_HINT, PairingModelError, _IGNORED_UNEXPECTED)
    del state
    identity = {"model": f"conch:{CONCH_ARCH}", "checkpoint": str(checkpoint), "sha256": sha256_file(path)}
    if model_cfg is not None:
        identity["config"] = model_cfg
    size = cfg["vision_cfg"]["image_size"]
    return ConchPairingModel("conch", model, conch_preprocess(size), conch_tokenizer(), identity, device, precision)


# -------------------------------------------------------------------------------------------- registry


def build_pairing_model(
    name: str, checkpoint: str | Path | None = None, device: str = "auto", precision: str = "fp32"
) -> PairingModel:
    dev = resolve_device(device)
    if name == "demo-clip":
        return load_demo_clip(checkpoint, dev, precision)
    if name == "conch":
        return load_conch(checkpoint, dev, precision)
    if name.startswith("open_clip:") and len(name) > len("open_clip:"):
        return load_open_clip(name.split(":", 1)[1], checkpoint, dev, precision)
    if name.startswith("hf-clip:") and len(name) > len("hf-clip:"):
        from clipit.pairing.hf_clip import HFClipError, load_hf_clip

        try:
            model, preprocess, tokenizer, identity = load_hf_clip(name, checkpoint)
        except HFClipError as err:
            raise PairingModelError(str(err)) from None
        return PairingModel(name, model, preprocess, tokenizer, identity, dev, precision)
    raise PairingModelError(
        f"unknown pairing model {name!r}; set pairing.model to conch, demo-clip, open_clip:<arch> or hf-clip:<name>"
    )
