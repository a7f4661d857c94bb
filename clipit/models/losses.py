"""Contrastive loss of the CLIP baselines' reference recipe (models/clip_baselines.py, prompt_loss infonce).

The reference code (BanafshehKarimian/ModalityPairing, Models/{CONCH,QUILT,PLIP,PathCLIP}Net.py) fine-tunes
each CLIP with CLIP's symmetric InfoNCE at a fixed temperature tau = 0.07 between the batch's images and
the first-template prompt of each image's class: row i's positive is column i, and other images of the
same class are negatives, as there."""

from __future__ import annotations

import torch
import torch.nn.functional as F

REFERENCE_TAU = 0.07


def symmetric_infonce(image_emb: torch.Tensor, text_emb: torch.Tensor, tau: float = REFERENCE_TAU) -> torch.Tensor:
    """(CE(I T^T / tau, diag) + CE(T I^T / tau, diag)) / 2 with I, T the L2-normalised [B, D] embeddings."""
    image = F.normalize(image_emb.float(), dim=-1)
    text = F.normalize(text_emb.float(), dim=-1)
    logits = image @ text.T / tau
    target = torch.arange(len(image), device=image.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
