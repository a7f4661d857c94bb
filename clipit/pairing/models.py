"""Pairing models behind one interface: preprocess, tokenize, encode_images, encode_texts, identity.

Embeddings come back L2-normalised in the model's joint image-text space (CONCH: 512-d).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import torch

from clipit.pairing.search import l2_normalize


class PairingModelError(ValueError):
    """Weights for a pairing model are missing or do not fit (one line, names what to fix)."""


class PairingModel:
    """An open_clip-style CLIP: `model.encode_image` / `model.encode_text` plus a tokenizer."""

    def __init__(self, name: str, model: torch.nn.Module, preprocess: Callable, tokenizer: Callable,
                 identity: dict, device: str | torch.device = "cpu"):
        self.name = name
        self.model = model.eval().to(device)
        self.preprocess = preprocess  # PIL image -> CHW float tensor
        self.tokenizer = tokenizer  # list[str] -> LongTensor [B, context]
        self.identity = identity  # what made the embeddings: caches and shard manifests record it
        self.device = torch.device(device)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.model.encode_image(images.to(self.device, non_blocking=True))
        return l2_normalize(feats.float())

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        feats = self.model.encode_text(self.tokenize(texts).to(self.device, non_blocking=True))
        return l2_normalize(feats.float())

    @property
    def embed_dim(self) -> int:
        return int(self.encode_texts(["x"]).shape[-1])


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_demo_clip(checkpoint: str | Path | None, device: str = "cpu") -> PairingModel:
    from clipit.pairing import demo_clip

    if checkpoint is None or not Path(checkpoint).is_file():
        raise PairingModelError(
            f"demo-clip checkpoint {checkpoint} not found; run `clipit demo` (it trains one) or set pairing.checkpoint"
        )
    model, preprocess, tokenizer = demo_clip.load_demo_clip(Path(checkpoint))
    identity = {"model": "demo-clip", "sha256": file_sha256(checkpoint)}
    return PairingModel("demo-clip", model, preprocess, tokenizer, identity, device)


def load_open_clip(arch: str, checkpoint: str | Path | None, device: str = "cpu") -> PairingModel:
    """Any open_clip architecture (QuiltNet, PLIP-style) from a local file or an `hf-hub:` ID."""
    import open_clip

    if checkpoint is None:
        raise PairingModelError(f"open_clip:{arch} needs pairing.checkpoint: a local weights file or hf-hub:<repo>")
    if not str(checkpoint).startswith("hf-hub:") and not Path(checkpoint).is_file():
        raise PairingModelError(f"{checkpoint}: weights file for open_clip:{arch} not found; fix pairing.checkpoint")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=str(checkpoint))
    except RuntimeError as err:  # strict state-dict load: missing/unexpected keys or shapes
        raise PairingModelError(f"{checkpoint}: does not fit open_clip:{arch} ({str(err).splitlines()[0]})") from None
    identity = {"model": f"open_clip:{arch}", "checkpoint": str(checkpoint)}
    if Path(checkpoint).is_file():
        identity["sha256"] = file_sha256(checkpoint)
    return PairingModel(f"open_clip:{arch}", model, preprocess, open_clip.get_tokenizer(arch), identity, device)


def build_pairing_model(name: str, checkpoint: str | Path | None = None, device: str = "auto") -> PairingModel:
    dev = resolve_device(device)
    if name == "demo-clip":
        return load_demo_clip(checkpoint, dev)
    if name.startswith("open_clip:"):
        return load_open_clip(name.split(":", 1)[1], checkpoint, dev)
    raise PairingModelError(f"unknown pairing model {name!r}; choose demo-clip or open_clip:<arch>")
