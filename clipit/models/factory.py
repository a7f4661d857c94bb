"""One method's model from the config: backbone (weights resolved and loaded) + method head.

`trainer.build_model` adds the warm start, the fine-tuning mode and the device preprocessing; the
export path rebuilds the same architecture from an export's JSON without any weights.
"""
from __future__ import annotations

from torch import nn

from clipit.config import ModelConfig, TrainConfig
from clipit.models.backbones import BackboneSpec, build_backbone, create_backbone, get_spec, resolve_weights
from clipit.models.clipit import build_classifier
from clipit.weights import WeightsSource

VISION_METHODS = ("unimodal", "clipit")  # predict from the image alone (exportable)


def build_method_model(mcfg: ModelConfig, tcfg: TrainConfig, num_classes: int, text_dim: int,
                       pretrained: bool = True) -> tuple[nn.Module, BackboneSpec, WeightsSource | None]:
    """(model, backbone spec, weights source). `pretrained=False` builds the architecture only.

    The text-only classifier has no backbone (and needs no backbone weights)."""
    spec = get_spec(mcfg.backbone)
    if tcfg.method == "text":
        return build_classifier("text", None, num_classes, text_dim, mcfg.kd_layers), spec, None
    if pretrained:
        source = resolve_weights(mcfg.backbone, mcfg.weights, mcfg.weights_file)
        backbone, spec = build_backbone(mcfg.backbone, source, mcfg.image_size, mcfg.weights_file)
    else:
        source, backbone = None, create_backbone(spec, mcfg.image_size)
    return build_classifier(tcfg.method, backbone, num_classes, text_dim, mcfg.kd_layers), spec, source
