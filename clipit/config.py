"""Typed configuration: YAML files in configs/ loaded into dataclasses.

Unknown keys and wrong types are errors naming the key and the file. Every setting has one home:
precision lives only in `train.precision`, seeds only in `seeds`, paths only in their section.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from clipit.errors import ConfigError  # noqa: F401 - re-exported: config errors are raised everywhere
from clipit.layout import check_name


# ---------------------------------------------------------------------------------------------
# Sections


@dataclass
class DemoDataConfig:
    """The embedded demo: generated H&E-like patches, an unpaired report corpus, a demo CLIP."""

    counts: dict[str, int] = field(default_factory=lambda: {"train": 2000, "val": 400, "test": 800})  # images per split
    image_size: int = 64  # patch side in pixels
    n_reports: int = 300  # reports in the unpaired corpus
    n_paired: int = 2000  # paired image-caption set that trains the stand-in for CONCH
    clip_steps: int = 150  # demo CLIP training steps (fixed, so the result does not depend on machine load)
    clip_seconds: float = 600.0  # safety cap on its wall time
    seed: int = 0  # seed of the generated images, reports and demo CLIP


@dataclass
class DataConfig:
    name: str = "demo"  # dataset reader: demo | pcam | crc | bach | folder
    root: str | None = None  # required for real datasets; the demo generates into <output_dir>/data/images
    demo: DemoDataConfig = field(default_factory=DemoDataConfig)


@dataclass
class ReportsConfig:
    path: str | None = None  # required for real corpora; the demo writes <output_dir>/data/reports.jsonl
    format: Literal["auto", "csv", "jsonl", "parquet", "txt"] = "auto"  # auto: from the file suffix
    organ: str | None = None  # keep reports whose organ contains this word ("breast", "colo")
    projects: list[str] | None = None  # or TCGA projects, e.g. [BRCA] / [COAD, READ]


@dataclass
class PairingConfig:
    model: str = "demo-clip"  # pairing-model registry name: demo-clip | conch | open_clip:<arch>
    checkpoint: str | None = None  # local weights; the demo CLIP defaults to <output_dir>/demo-clip/
    top_k: int = 1  # texts kept per image (shards.use_rank picks among them)
    batch_size: int = 256  # images per encoder batch
    device: str = "auto"  # auto | cpu | cuda
    dir: str | None = None  # text-embedding cache and pair indices; default <output_dir>/pairing
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # encoder autocast (GPU); recorded in the identity
    num_workers: int = 0  # DataLoader workers that decode + preprocess images
    search: Literal["auto", "torch", "faiss"] = "auto"  # exact top-k backend; auto = faiss on CPU for many texts
    texts: Literal["reports", "class_prompts"] = "reports"  # class_prompts: 22 CONCH templates x class names
    class_names: list[str] | None = None  # prompt name per class (label order); default per dataset


@dataclass
class ShardsConfig:
    dir: str | None = None  # default <output_dir>/shards
    samples_per_shard: int = 1000  # samples per tar
    use_rank: int = 1  # which of the top-k texts each image gets (1 = best; 2..5 = the Fig. 5 ablation)
    random_report_seed: int | None = None  # set: a uniformly random text per image instead (seeded control)


@dataclass
class LoraConfig:
    enabled: bool = True  # finetune: auto uses LoRA when enabled
    r: int = 16  # LoRA rank
    alpha: int = 8  # LoRA scale alpha (update = alpha / r * B A)
    dropout: float = 0.0  # dropout on the LoRA input
    # module types that get adapters, in the backbone and the warm-started head
    targets: list[Literal["Linear", "Conv2d", "Embedding"]] = field(
        default_factory=lambda: ["Linear", "Conv2d", "Embedding"]
    )


@dataclass
class ModelConfig:
    backbone: str = "demo-vit-tiny"  # backbone registry name
    weights: str | None = None  # checkpoint path, hub ID or `random`; None = weights file, then hub (clipit/weights.py)
    weights_file: str | None = None  # YAML name -> checkpoint map (configs/weights.example.yaml); else $CLIPIT_WEIGHTS
    image_size: int | None = None  # None = the backbone's native input size
    lora: LoraConfig = field(default_factory=LoraConfig)
    text_dim: int = 512  # dimension of the report embeddings in the shards
    kd_layers: int = 1  # P is Linear (1) or Linear-LeakyReLU-Linear (2)


@dataclass
class TrainConfig:
    method: Literal["unimodal", "clipit", "text", "late_fusion", "early_fusion"] = "clipit"  # the model kind
    finetune: Literal["auto", "frozen", "lora", "full"] = "auto"  # auto: unimodal frozen, else lora if model.lora.enabled
    epochs: float = 1.0  # passes over the train split (fractions allowed)
    batch_size: int = 64  # per process
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"  # the optimizer of every trainable parameter
    lr: float = 1e-3  # peak learning rate
    weight_decay: float = 1e-4  # decoupled for adamw, L2 for adam and sgd
    momentum: float = 0.9  # sgd only (Nesterov)
    schedule: Literal["none", "cosine"] = "none"  # cosine: from lr to min_lr over the run
    min_lr: float = 0.0  # the cosine schedule's floor
    grad_clip: float = 0.5  # max gradient norm (0 = off)
    lam: float = 1.0  # weight of the cosine distillation term
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # the only precision setting (accelerate + DeepSpeed)
    distributed: Literal["ddp", "zero2"] = "ddp"  # zero2: DeepSpeed ZeRO-2 with a config derived from this one
    checkpoint_every: int = 0  # steps between resume checkpoints; 0 = at every evaluation
    num_workers: int = 0  # loader worker processes per rank
    evals_per_epoch: int = 1  # validations per epoch
    select: Literal["val_loss", "val_bacc", "last"] = "val_loss"  # which validation picks best.safetensors
    warm_start: str | None = None  # method whose best checkpoint initialises this one (CLIP-IT: unimodal)
    text_warm_start: str | None = None  # late_fusion: method (text) whose H_t initialises the text branch, same seed
    augment: bool = True  # flips and 90-degree rotations: histology has no canonical orientation
    # cached: the report embeddings stored in the shards (frozen text side). tower: the pairing model's
    # text tower (pairing.model / pairing.checkpoint) encodes the paired report in every step, with LoRA
    # under finetune lora, inside the same nn.Module as the vision side (the paper's default; CLIP-IT only)
    text_encoder: Literal["cached", "tower"] = "cached"
    word_drop: float = 0.0  # fraction of each report's tokens (between start and end of text) corrupted per step
    word_drop_mode: Literal["mask", "remove"] = "mask"  # mask: a <mask> embedding (reference code); remove: delete


@dataclass
class ExperimentConfig:
    name: str = "demo"  # experiment name (labels only)
    output_dir: str = "runs/demo"  # everything the stages write: pairing/, shards/, runs/<method>/seed-<n>/
    seeds: list[int] = field(default_factory=lambda: [0])  # one run per method and seed
    data: DataConfig = field(default_factory=DataConfig)
    reports: ReportsConfig = field(default_factory=ReportsConfig)
    pairing: PairingConfig = field(default_factory=PairingConfig)
    shards: ShardsConfig = field(default_factory=ShardsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    methods: dict[str, TrainConfig] = field(default_factory=dict)  # method name -> its training settings


# ---------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path, overrides: list[str] | None = None, cls: type = ExperimentConfig):
    """Load YAML `path` into `cls`; `overrides` are `dotted.key=yaml-value` strings."""
    path = Path(path)
    raw = read_yaml(path, "config file")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    for item in overrides or []:
        apply_override(raw, item, path)
    config = from_dict(cls, raw, str(path))
    if isinstance(config, ExperimentConfig):
        check_methods(config, str(path))
        method_order(config, str(path))  # unknown warm starts and cycles are load errors
        return resolve_paths(config, str(path))
    return config


def check_methods(cfg: ExperimentConfig, where: str = "<config>") -> None:
    """Settings that only make sense together (each error names the key and the fix)."""
    for name, m in cfg.methods.items():
        key = f"methods.{name}"
        check_name(name, f"{where}: {key}: method name")
        if m.text_warm_start and not m.warm_start:
            raise ConfigError(f"{where}: {key}.text_warm_start = {m.text_warm_start!r} needs warm_start too (the text "
                              "run is found next to the warm-start run of the same seed)")
        if m.text_encoder == "tower" and m.method != "clipit":
            raise ConfigError(f"{where}: {key}.text_encoder: tower is for method clipit (got {m.method!r}); "
                              "use text_encoder: cached")
        if m.text_encoder == "tower" and m.lam == 0:
            raise ConfigError(f"{where}: {key}.text_encoder: tower needs lam > 0 (with lam 0 the tower gets no "
                              "gradient and DDP fails on its unused parameters); use text_encoder: cached")
        if not 0.0 <= m.word_drop < 1.0:
            raise ConfigError(f"{where}: {key}.word_drop = {m.word_drop} must be in [0, 1)")
        if m.word_drop and m.text_encoder != "tower":
            raise ConfigError(f"{where}: {key}.word_drop needs text_encoder: tower (cached embeddings have no words "
                              "to drop)")


def method_order(cfg: ExperimentConfig, where: str = "<config>") -> list[str]:
    """Methods sorted so that each warm start is trained before the method that needs it."""
    order: list[str] = []

    def visit(name: str, trail: tuple = ()):
        if name in order:
            return
        if name not in cfg.methods:
            raise ConfigError(f"{where}: methods.{trail[-1]} warm-starts from unknown method {name!r}; "
                              f"known: {sorted(cfg.methods)}")
        if name in trail:
            raise ConfigError(f"{where}: warm_start cycle: {' -> '.join(trail + (name,))}; "
                              "remove one of these warm_start settings")
        for dependency in (cfg.methods[name].warm_start, cfg.methods[name].text_warm_start):
            if dependency:
                visit(dependency, trail + (name,))
        order.append(name)

    for name in cfg.methods:
        visit(name)
    return order


def resolve_paths(cfg: ExperimentConfig, where: str = "<config>") -> ExperimentConfig:
    """Fill stage paths left empty from output_dir, so each location is written down once."""
    out = Path(cfg.output_dir)
    cfg.pairing.dir = cfg.pairing.dir or str(out / "pairing")
    cfg.shards.dir = cfg.shards.dir or str(out / "shards")
    if cfg.data.name == "demo":
        cfg.data.root = cfg.data.root or str(out / "data" / "images")
        cfg.reports.path = cfg.reports.path or str(out / "data" / "reports.jsonl")
        if cfg.pairing.model == "demo-clip":
            cfg.pairing.checkpoint = cfg.pairing.checkpoint or str(out / "demo-clip" / "model.safetensors")
    for key, value in [("data.root", cfg.data.root), ("reports.path", cfg.reports.path)]:
        if value is None:
            raise ConfigError(f"{where}: {key} is required for dataset {cfg.data.name!r}")
    return cfg


def read_yaml(path: Path, what: str):
    """Parsed YAML of `path`; a missing or malformed file is one ConfigError line naming it."""
    try:
        return yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})".replace("\n", " ")) from None


def apply_override(raw: dict, item: str, path: Path | str = "<overrides>") -> None:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"{path}: override {item!r} must look like section.key=value")
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{path}: override {key!r} goes through a non-mapping value")
    node[parts[-1]] = yaml.safe_load(value)


def from_dict(cls: type, data: Any, where: str, prefix: str = ""):
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: {prefix or 'top level'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key {_join(prefix, unknown[0])!r}; valid keys here: {sorted(names)}")
    kwargs = {k: _coerce(hints[k], v, where, _join(prefix, k)) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def dump_config(config, path: str | Path) -> None:
    """Write the fully resolved config next to a run's outputs (atomic)."""
    from clipit.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(config), sort_keys=False))


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _coerce(tp, value, where: str, key: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, where, key)
            except ConfigError as err:
                errors.append(str(err))
        raise errors[0] if len(errors) == 1 else ConfigError(f"{where}: {key} = {value!r} matches none of {tp}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {key} = {value!r} is not one of {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {key} must be a list, got {type(value).__name__}")
        return [_coerce(args[0], v, where, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key} must be a mapping, got {type(value).__name__}")
        return {str(k): _coerce(args[1], v, where, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where, key)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    if tp is Any:
        return value
    raise ConfigError(f"{where}: {key} must be {getattr(tp, '__name__', tp)}, got {value!r} ({type(value).__name__})")
