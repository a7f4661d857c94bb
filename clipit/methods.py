"""The method registry: one `MethodSpec` per method (`methods.<name>.method` in a config), the one home of
everything the stages need to know about a method, the way timm registers its architectures.

Config validation, `--help`, the model factory, the trainer, export, the grid's cost and listings, the
report (labels, groups, order), doctor and TensorBoard read a method's spec instead of spelling its
name. The specs are declarative and sit in the base layer, so a config is validated when it loads;
each names its model builder as an entry point (`"package.module:function"`, resolved on first use by
clipit/models/factory.py) or holds the builder itself. A builder takes a `ModelParts` and returns the
nn.Module (forward: (images, text_emb) -> {"logits": ...}).

Adding a method (docs/architecture.md, "Adding a method"):

    @register_method(name="toy", label="toy probe", group="vision")
    def build_toy(parts: ModelParts) -> nn.Module:
        return ToyModel(parts.backbone, parts.num_classes)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from clipit.errors import ConfigError

# The report's method groups, in report order: "main" is Table 1 (the vision model alone, the paper's
# comparison), every other group goes to the baselines table and the Pareto plot's hollow markers
GROUPS = ("main", "vision", "multimodal", "clip")
# The paper's comparisons name a method by the role it plays: Table 1 is "probe" vs "proposed", Ω is
# "text" right and "probe" wrong, the LoRA search tunes "proposed"
ROLES = ("probe", "proposed", "text")


@dataclass
class ModelParts:
    """What a builder gets: the image encoder (model.backbone, the CLIP's vision tower, or None for a
    method without images), the sizes, and for a CLIP method being trained or evaluated its CLIP
    (clipit/models/clip_baselines.py: ClipSource; None when an export's bare architecture is rebuilt)."""

    backbone: Any
    num_classes: int
    text_dim: int = 512
    kd_layers: int = 1
    clip: Any = None


@dataclass(frozen=True)
class MethodSpec:
    name: str  # what a config's methods.<m>.method says
    # "package.module:function" or a callable: ModelParts -> nn.Module
    builder: str | Callable[[ModelParts], Any]
    label: str  # the report's name of the method
    group: str = "vision"  # report section, one of GROUPS
    # what encodes the images, and what the cost of a cell charges: "backbone" (model.backbone), "clip" (the
    # `clip` section's CLIP: its vision tower, its checkpoint; no warm start from another run), None (no images)
    vision: str | None = "backbone"
    finetune_auto: str = "lora"  # what finetune: auto means: "frozen", or "lora" (lora if model.lora.enabled)
    trains: bool = True  # False: the model is saved as built (nothing trains: finetune auto or frozen only)
    text_at_test: bool = False  # the prediction reads the paired report (so it needs one at test time)
    reads_reports: bool = False  # training reads the paired reports' embeddings from the shards
    text_tower: bool = False  # may encode the paired reports with the pairing text tower (text_encoder: tower)
    imports_head: bool = False  # a linear probe whose head may be imported (head_from) instead of trained
    towers_only: bool = False  # trains the pretrained towers alone: frozen, it would train nothing
    trains_prompts: bool = False  # trains against class prompts: methods.<m>.prompt_loss applies (ce | infonce)
    role: str = ""  # its part in the paper's comparisons, one of ROLES, or ""
    description: str = ""  # a few words for listings (grid dry run); default: the label
    row_label: str = ""  # its row among the ablation table's main runs; default: the label
    marker: str = "s"  # its marker in the Pareto plot
    line: Any = "-"  # its line style in the training curves
    hint: str = ""  # what to use instead when a setting is refused for it (appended to the error)

    @property
    def exportable(self) -> bool:
        """A vision-only model: `clipit export` writes it; others are refused with one line."""
        return self.vision is not None and not self.text_at_test

    @property
    def uses_clip(self) -> bool:
        return self.vision == "clip"

    def finetune(self, setting: str, lora_enabled: bool) -> str:
        """methods.<m>.finetune resolved: auto -> this method's default."""
        if setting != "auto":
            return setting
        return "lora" if self.finetune_auto == "lora" and lora_enabled else "frozen"

    def finetune_shown(self, setting: str, lora_enabled: bool) -> str:
        """The fine-tuning as listings show it: "-" for a method without a pretrained image encoder."""
        return "-" if self.vision is None else self.finetune(setting, lora_enabled)


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec | None = None, /, **fields_):
    """Register `spec` (returned), or, used as `@register_method(name=..., label=..., ...)` on a builder,
    the spec of that builder (the builder is returned). A name registers once."""
    if spec is None:

        def decorate(builder):
            register_method(MethodSpec(builder=builder, **fields_))
            return builder

        return decorate
    for key, value, valid in (
        ("group", spec.group, GROUPS),
        ("role", spec.role, ROLES + ("",)),
        ("vision", spec.vision, ("backbone", "clip", None)),
        ("finetune_auto", spec.finetune_auto, ("frozen", "lora")),
    ):
        if value not in valid:
            raise ValueError(f"method {spec.name}: {key} = {value!r} is not one of {list(valid)}")
    if spec.name in _REGISTRY:
        raise ValueError(f"method {spec.name!r} is registered already ({_REGISTRY[spec.name].builder})")
    if spec.role and any(s.role == spec.role for s in _REGISTRY.values()):
        raise ValueError(f"method {spec.name}: role {spec.role!r} is taken by {role_method(spec.role)}")
    _REGISTRY[spec.name] = spec
    return spec


def unregister_method(name: str) -> None:
    """Remove a method (tests register toy methods for one test)."""
    _REGISTRY.pop(name, None)


def method_names() -> tuple[str, ...]:
    """Registered methods, in registration order (the report's order within a group)."""
    return tuple(_REGISTRY)


def method_spec(name: str, where: str = "") -> MethodSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        prefix = f"{where}: " if where else ""
        raise ConfigError(f"{prefix}unknown method {name!r}; choose one of {', '.join(_REGISTRY)}") from None


def known_spec(name: str) -> MethodSpec | None:
    """The spec of `name`, None for a name not registered (a report reading an old or foreign run)."""
    return _REGISTRY.get(name)


def role_method(role: str) -> str:
    """The method that plays `role` in the paper's comparisons ("" when none is registered)."""
    return next((s.name for s in _REGISTRY.values() if s.role == role), "")


def in_group(*groups: str) -> tuple[str, ...]:
    """Methods of these report groups: groups in GROUPS order, registration order within one."""
    return tuple(s.name for g in GROUPS if g in groups for s in _REGISTRY.values() if s.group == g)


def report_order() -> tuple[str, ...]:
    return in_group(*GROUPS)


def _builtin(**kw) -> MethodSpec:
    return register_method(MethodSpec(**kw))


# ---------------------------------------------------------------------------------------------
# The built-in methods (method.md): Table 1's pair, the baselines that need the paired report, the CLIP
# baselines. Their builders live next to their model classes.

_builtin(
    name="unimodal",
    builder="clipit.models.clipit:build_vision_classifier",
    label="Unimodal",
    group="main",
    finetune_auto="frozen",  # the linear probe
    imports_head=True,
    role="probe",
    row_label="unimodal (linear probe)",
    marker="o",
    line="--",
)
_builtin(
    name="eva_probe",  # the same model as unimodal, trained under kaiko eva's offline protocol (the paper's column)
    builder="clipit.models.clipit:build_vision_classifier",
    label="Unimodal (eva protocol)",
    group="main",
    finetune_auto="frozen",
    imports_head=True,
    description="linear probe, kaiko eva 0.1.0 recipe",
    row_label="unimodal (eva-protocol linear probe)",
    marker="s",
    line="--",
)
_builtin(
    name="clipit",
    builder="clipit.models.clipit:build_clipit",
    label="CLIP-IT",
    group="main",
    reads_reports=True,
    text_tower=True,
    role="proposed",
    row_label="CLIP-IT (full)",
    marker="^",
    line="-",
)
_builtin(
    name="text",
    builder="clipit.models.baselines:build_text",
    label="text-only",
    group="multimodal",
    vision=None,
    text_at_test=True,
    reads_reports=True,
    role="text",
    description="report embedding -> MLP",
    marker="x",
    line=":",
)
_builtin(
    name="late_fusion",
    builder="clipit.models.baselines:build_late_fusion",
    label="late fusion",
    group="multimodal",
    text_at_test=True,
    reads_reports=True,
    text_tower=True,  # text_encoder: tower: the reference's LoRA on the text side, also at test time
    marker="D",
    line="-.",
)
_builtin(
    name="early_fusion",
    builder="clipit.models.baselines:build_early_fusion",
    label="early fusion",
    group="multimodal",
    text_at_test=True,
    reads_reports=True,
    marker="P",
    line=(0, (5, 1, 1, 1)),
)
_builtin(
    name="zero_shot",
    builder="clipit.models.clip_baselines:build_zero_shot",
    label="CLIP zero-shot",
    group="clip",
    vision="clip",
    finetune_auto="frozen",
    trains=False,
    hint="or method prompt_ft to fine-tune the CLIP",
    marker="*",
)
_builtin(
    name="prompt_ft",
    builder="clipit.models.clip_baselines:build_prompt_ft",
    label="CLIP prompt fine-tuning",
    group="clip",
    vision="clip",
    towers_only=True,
    trains_prompts=True,
    hint="or use method zero_shot",
    marker="v",
)
_builtin(
    name="clip_probe",
    builder="clipit.models.clipit:build_vision_classifier",
    label="CLIP vision tower + linear head",
    group="clip",
    vision="clip",
    finetune_auto="frozen",
    marker="h",
)
