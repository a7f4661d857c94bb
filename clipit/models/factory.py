"""Model assembly: the one place that builds every method's model, for training, evaluation and export.

A method's model comes from its spec's builder (clipit/methods.py), called with the parts built here.

`build_model` gives the trainable model of a (config, method): backbone with its weights resolved and
loaded, method head, warm start copied in, optional text tower, LoRA/frozen/full fine-tuning, and
the device preprocessing. `build_classifier` gives the bare architecture, which the export path
rebuilds from an export's JSON without any weights.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from clipit import layout
from clipit.config import ConfigError, ExperimentConfig, ModelConfig, TrainConfig
from clipit.errors import one_line
from clipit.methods import MethodSpec, ModelParts, method_spec
from clipit.models import clip_baselines
from clipit.models.backbones import BackboneSpec, build_backbone, get_spec, resolve_weights
from clipit.models.checkpoint import load_model_state
from clipit.models.clipit import prepare_finetune
from clipit.models.preprocess import DevicePreprocess
from clipit.pairing.text_tower import build_text_tower
from clipit.weights import WeightsSource, resolve_pairing_checkpoint


def builder_of(spec: MethodSpec) -> Callable[[ModelParts], nn.Module]:
    """The spec's builder: the callable itself, or its entry point `package.module:function` imported on
    first use (the specs sit below models/ so that a config is validated without importing them)."""
    if callable(spec.builder):
        return spec.builder
    if spec.builder not in _BUILDERS:
        module, _, name = spec.builder.partition(":")
        try:
            _BUILDERS[spec.builder] = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError) as err:
            raise ConfigError(
                f"method {spec.name}: its builder {spec.builder!r} does not resolve ({one_line(err)}); register "
                "the method with an importable `package.module:function`"
            ) from None
    return _BUILDERS[spec.builder]


_BUILDERS: dict[str, Callable[[ModelParts], nn.Module]] = {}


def build_classifier(
    method: str, backbone: nn.Module | None, num_classes: int, text_dim: int, kd_layers: int, clip=None
) -> nn.Module:
    """The method's bare model around `backbone` (None for a method without images); `clip` is the CLIP
    of a CLIP method being trained or evaluated (clip_baselines.ClipSource)."""
    return builder_of(method_spec(method))(ModelParts(backbone, num_classes, text_dim, kd_layers, clip))


def build_method_model(
    mcfg: ModelConfig, tcfg: TrainConfig, num_classes: int, text_dim: int
) -> tuple[nn.Module, BackboneSpec, WeightsSource | None]:
    """(model, backbone spec, weights source). A method without images has no backbone (and needs no
    backbone weights)."""
    spec = get_spec(mcfg.backbone)
    if method_spec(tcfg.method).vision is None:
        return build_classifier(tcfg.method, None, num_classes, text_dim, mcfg.kd_layers), spec, None
    source = resolve_weights(mcfg.backbone, mcfg.weights, mcfg.weights_file)
    backbone, spec = build_backbone(mcfg.backbone, source, mcfg.image_size, mcfg.weights_file, mcfg.timm_kwargs)
    return build_classifier(tcfg.method, backbone, num_classes, text_dim, mcfg.kd_layers), spec, source


def build_model(
    cfg: ExperimentConfig,
    tcfg: TrainConfig,
    num_classes: int,
    text_dim: int,
    warm_start: Path | None = None,
    text_tower: bool = True,
):
    """The method's model (backbone weights resolved and loaded, warm start copied in, LoRA/frozen/full
    fine-tuning set up) and the device preprocessing for its backbone. `text_tower=False` leaves out a
    trainable text tower (text_encoder: tower): evaluation and export run the vision model only.

    Backbone weights found through the weights file or the hub are written back to cfg.model.weights,
    so the run's config.yaml records exactly which checkpoint was used (and rebuilds use it again).
    """
    method = method_spec(tcfg.method)
    finetune = method.finetune(tcfg.finetune, cfg.model.lora.enabled)
    if method.uses_clip:  # the CLIP's own towers, not model.backbone
        clip = clip_baselines.load_clip(cfg, text_tower, tcfg.prompt_loss)
        model = build_classifier(tcfg.method, clip.vision, num_classes, text_dim, cfg.model.kd_layers, clip)
        clip.describe(model)
        prepare_finetune(model, finetune, cfg.model.lora, warm_head=False)
        return model, clip.preprocess
    model, spec, source = build_method_model(cfg.model, tcfg, num_classes, text_dim)
    if source is not None and source.kind != "random":
        cfg.model.weights = source.stored
    if warm_start is not None:  # CLIP-IT starts from the unimodal probe's backbone and head
        load_model_state(warm_start, model, prefixes=model.warm_start_prefixes)
    if tcfg.text_warm_start:  # late fusion: H_t from the text model of the same seed
        if warm_start is not None:  # training; evaluation reloads H_t from the run's own checkpoint
            text_best = layout.warm_start(Path(warm_start).parent, tcfg.text_warm_start)
            if not text_best.with_suffix(".json").exists():
                raise ConfigError(f"{text_best}.json: text warm start is missing; train {tcfg.text_warm_start} first")
            load_model_state(text_best, model, prefixes=("text_head.",))
    if text_tower:
        attach_text_tower(model, cfg, tcfg, text_dim)
    # train_head: the warm-started W_v is not a pretrained module, so it trains in full (config_checks.check_methods)
    warm_head = tcfg.warm_start is not None and not tcfg.train_head
    prepare_finetune(model, finetune, cfg.model.lora, warm_head=warm_head)
    mean, std = (cfg.model.mean, cfg.model.std) if cfg.model.mean is not None else (spec.mean, spec.std)
    preprocess = DevicePreprocess(cfg.model.image_size or spec.input_size, mean, std)
    return model, preprocess


def attach_text_tower(model: nn.Module, cfg: ExperimentConfig, tcfg: TrainConfig, text_dim: int) -> None:
    """Give a CLIP-IT model the pairing model's text tower (before LoRA is injected); config_checks.check_methods
    admits text_encoder: tower only for a method whose spec says text_tower."""
    if tcfg.text_encoder != "tower":
        return
    checkpoint = resolve_pairing_checkpoint(cfg.pairing.model, cfg.pairing.checkpoint, cfg.model.weights_file)
    tower = build_text_tower(cfg.pairing.model, checkpoint)
    with torch.no_grad():
        dim = int(tower(tower.tokenize(["x"])).shape[-1])
    if dim != text_dim:
        raise ConfigError(
            f"pairing.model {cfg.pairing.model}: its text tower gives {dim}-d embeddings but the shards "
            f"hold {text_dim}-d ones; train with the pairing model that built the shards"
        )
    model.text_tower = tower
