"""The pairing model's text tower as a trainable module (method.md Stage 4, h_phi), and word drop.

CLIP-IT's default text side encodes each paired report in every step with the pairing model's own
text tower (CONCH), carrying LoRA, so the distillation target moves with training. `TextTower` holds
only what `encode_text` uses (the image tower, CoCa's caption decoder and the logit scale are
dropped), so every parameter it has takes part in the forward pass: full fine-tuning under DDP then
never meets an unused parameter.

Word drop (the Fig. 5 ablation) corrupts k% of the tokens strictly between <start> and <end> of each
report, per step:
  mask    the reference code: the tokens' embeddings become a <mask> embedding, a fixed copy of the
          <end> token's base embedding (token ids are left as they are, so argmax-pooled towers still
          find <end>)
  remove  the paper's prose ("words removed"): the tokens are deleted and the rest shifts left
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from clipit.pairing.encoders import PairingModel, PairingModelError

UNUSED_BY_TEXT = ("visual", "text_decoder", "logit_scale", "logit_bias")


class MaskableEmbedding(nn.Module):
    """A token embedding whose output at flagged positions is replaced by a fixed <mask> vector (a buffer:
    the reference's new <mask> row sat in the frozen base embedding too)."""

    def __init__(self, base: nn.Embedding, mask_token_id: int):
        super().__init__()
        self.base = base
        self.register_buffer("mask_vector", base.weight.detach()[mask_token_id].clone())
        self.positions: torch.Tensor | None = None  # set by TextTower for one forward pass

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.base(ids)
        if self.positions is None:
            return out
        positions = self.positions[:, : ids.shape[1]]  # CoCa drops the last (CLS) slot before embedding
        return torch.where(positions.unsqueeze(-1), self.mask_vector.to(out.dtype), out)


class TextTower(nn.Module):
    """tokens [B, L] -> unit-norm text embeddings [B, D] from a CLIP/CoCa's `encode_text`."""

    def __init__(self, clip: nn.Module, tokenizer: Callable[[list[str]], torch.Tensor], name: str):
        super().__init__()
        for attr in UNUSED_BY_TEXT:
            if hasattr(clip, attr):
                delattr(clip, attr)
        self.clip = clip
        self.tokenizer = tokenizer
        self.name = name
        empty = tokenizer([""])[0]
        self.start_id, self.end_id, self.pad_id = int(empty[0]), int(empty[1]), int(empty[-1])
        path, owner, embedding = _token_embedding(clip)
        owner.token_embedding = MaskableEmbedding(embedding, self.end_id)
        # found by path, not held as a second submodule (state_dict would list its tensors twice)
        self.embedding_path = path

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(list(texts))

    def forward(self, tokens: torch.Tensor, masked: torch.Tensor | None = None) -> torch.Tensor:
        if masked is None:  # many images share a report (M is small, N large): encode each distinct one once
            unique, inverse = torch.unique(tokens, dim=0, return_inverse=True)
            if len(unique) < len(tokens):
                return self._encode(unique, None)[inverse]
        return self._encode(tokens, masked)

    def _encode(self, tokens: torch.Tensor, masked: torch.Tensor | None) -> torch.Tensor:
        embedding = self.clip.get_submodule(self.embedding_path)
        embedding.positions = masked
        try:
            return self.clip.encode_text(tokens, normalize=True)
        finally:
            embedding.positions = None


def _token_embedding(clip: nn.Module) -> tuple[str, nn.Module, nn.Embedding]:
    """(its path, module that owns `token_embedding`, the embedding): the CLIP itself, its `text` tower
    (CoCa), or the text model's embeddings (a transformers CLIP, clipit/pairing/hf_clip.py)."""
    for path, owner in (("", clip), ("text", getattr(clip, "text", None))):
        if owner is not None and isinstance(getattr(owner, "token_embedding", None), nn.Embedding):
            return f"{path}.token_embedding".lstrip("."), owner, owner.token_embedding
    text_model = getattr(clip, "text_model", None)
    if isinstance(text_model, nn.Module):
        for path, owner in text_model.named_modules():
            if isinstance(getattr(owner, "token_embedding", None), nn.Embedding):
                return f"text_model.{path}.token_embedding", owner, owner.token_embedding
    raise PairingModelError(
        f"{type(clip).__name__} has no token_embedding (not an open_clip/CONCH text tower, e.g. "
        "an HF text model); train with text_encoder: cached"
    )


def text_tower_from(pairing: PairingModel, copy: bool = True) -> TextTower:
    """The pairing model's text side (on CPU, train mode, all parameters frozen); `copy=False` takes the
    pairing model's own module (cheaper for CONCH's 395M parameters when the pairing model is not reused)."""
    import copy as copying

    clip = (copying.deepcopy(pairing.model) if copy else pairing.model).cpu()
    for p in clip.parameters():
        p.requires_grad = False
    return TextTower(clip, pairing.tokenizer, pairing.name).train()


def build_text_tower(name: str, checkpoint: str | None) -> TextTower:
    """The text tower of a pairing model from the registry (same names and checkpoints as pairing)."""
    from clipit.pairing.encoders import build_pairing_model

    return text_tower_from(build_pairing_model(name, checkpoint, device="cpu"), copy=False)


# ---------------------------------------------------------------------------------------------
# Word drop


def droppable(tokens: torch.Tensor, start_id: int, end_id: int) -> torch.Tensor:
    """Positions strictly after <start> and before the first <end> of each row."""
    positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    is_end = tokens == end_id
    first_end = torch.where(is_end.any(1), is_end.int().argmax(1), tokens.shape[1])  # no <end>: up to the last
    return (positions > 0) & (positions < first_end.unsqueeze(1)) & (tokens[:, :1] == start_id)


def choose_dropped(
    tokens: torch.Tensor, fraction: float, start_id: int, end_id: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """round(fraction * n) positions per row, uniformly among its n droppable tokens (bool [B, L])."""
    allowed = droppable(tokens, start_id, end_id)
    count = torch.round(allowed.sum(1).float() * fraction).long()
    scores = torch.rand(tokens.shape, generator=generator).to(tokens.device)
    scores = torch.where(allowed, scores, torch.full_like(scores, 2.0))  # never pick a special/pad position
    rank = scores.argsort(1).argsort(1)
    return (rank < count.unsqueeze(1)) & allowed


def remove_tokens(tokens: torch.Tensor, dropped: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Delete the dropped tokens, shift the rest left (order kept), pad the tail."""
    order = torch.sort(dropped.int(), dim=1, stable=True).indices
    out = tokens.gather(1, order)
    kept = (~dropped).sum(1, keepdim=True)
    tail = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0) >= kept
    return out.masked_fill(tail, pad_id)


def corrupt(
    tokens: torch.Tensor, tower: TextTower, fraction: float, mode: str, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(tokens, mask positions) for one training step of the word-drop ablation."""
    if fraction <= 0:
        return tokens, None
    dropped = choose_dropped(tokens, fraction, tower.start_id, tower.end_id, generator)
    if mode == "remove":
        return remove_tokens(tokens, dropped, tower.pad_id), None
    if mode == "mask":
        return tokens, dropped
    raise ValueError(f"word_drop_mode must be mask or remove, got {mode!r}")
