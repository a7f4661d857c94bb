"""A CLIP's image tower as a vision backbone: `model.backbone: clip:<pairing model>` (clip:conch,
clip:open_clip:hf-hub:wisdomik/QuiltNet-B-32, clip:hf-clip:plip, ...), so every method that takes a
backbone (CLIP-IT, the unimodal probe) runs on it: the reference's "CLIP-IT on the vision towers of
CONCH, QuiltNet, PLIP and PathCLIP". The tower is the CLIP baselines' (models/clip_baselines.py): the
L2-normalised joint-space image embedding, at the CLIP's own input size and normalisation.

Weights: model.weights, else the weights file's entry for the pairing-model name (`conch:`,
`hf-clip:plip:`), else none (open_clip:hf-hub:<repo> brings its own). They are the CLIP's checkpoint,
which rebuilds the tower, so run checkpoints hold only what training changed (as for the CLIP baselines).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from torch import nn

from clipit.models import clip_baselines
from clipit.models.backbones import clip_weights
from clipit.pairing.encoders import build_pairing_model


def build_clip_backbone(spec, weights=None, weights_file: str | Path | None = None) -> tuple[nn.Module, object]:
    """(the CLIP's image tower, `spec` with the CLIP's input size, normalisation and width); the
    BackboneSpec builder of clip:<pairing model> (models/backbones.py)."""
    source = clip_weights(spec.name, weights, weights_file)
    pairing = build_pairing_model(spec.name.split(":", 1)[1], source.location, device="cpu")
    vision = clip_baselines.vision_tower(pairing)
    vision.weights_from_clip = True  # run checkpoints never hold its base weights (models/checkpoint.py)
    size, mean, std = clip_baselines.input_spec(pairing, vision)
    # what an export records to rebuild the tower without the CLIP (clip_baselines.export_fields)
    vision.clip_architecture = clip_baselines.architecture(pairing, vision)
    vision.clip_identity = {"model": pairing.name, "checkpoint": source.location}
    return vision, replace(spec, input_size=size, mean=tuple(mean), std=tuple(std), dim=int(vision.num_features))
