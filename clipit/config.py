"""Typed configuration: YAML files in configs/ loaded into dataclasses.

Unknown keys, wrong types and out-of-range values are errors naming the key and the file. Every
setting has one home: precision lives only in `methods.<m>.precision`, seeds only in `seeds`, paths only
in their section. A number's valid range is written once, in its field's type (`Annotated[...,
Range(...)]` below): the loader checks it and docs/config.md lists it. The rules across keys, the
path expansion and the path defaults that load_config applies after parsing live in clipit/config_checks.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import yaml

from clipit.config_checks import check_methods, check_sections, expand_paths, method_order, resolve_paths
from clipit.errors import ConfigError
from clipit.methods import method_names
from clipit.typed_yaml import Items, OneOf, Range, apply_override, from_dict, read_yaml

# ---------------------------------------------------------------------------------------------
# Valid ranges: the one home of each key's bounds (the loader checks them, docs/config.md shows them)


Positive = Annotated[int, Range(ge=1)]  # a count of things that must exist (batch size, rank ...)
Count = Annotated[int, Range(ge=0)]  # 0 allowed (workers, seeds, "off")
PositiveFloat = Annotated[float, Range(gt=0)]
NonNegative = Annotated[float, Range(ge=0)]
Fraction = Annotated[float, Range(ge=0, lt=1)]
Side = Annotated[int, Range(ge=8)]  # an image side in pixels
ChannelMeans = Annotated[list[Annotated[float, Range(ge=0, le=1)]], Items(min=3, max=3)]  # R, G, B of [0, 1] pixels
ChannelStds = Annotated[list[Annotated[float, Range(gt=0)]], Items(min=3, max=3)]


# ---------------------------------------------------------------------------------------------
# Sections


@dataclass
class DemoDataConfig:
    """The embedded demo: generated H&E-like patches, an unpaired report corpus, a demo CLIP."""

    counts: dict[str, Positive] = field(
        default_factory=lambda: {"train": 2000, "val": 400, "test": 800}
    )  # images per split
    image_size: Side = 64  # patch side in pixels
    n_reports: Positive = 300  # reports in the unpaired corpus
    n_paired: Annotated[int, Range(ge=2)] = 2000  # paired image-caption set that trains the stand-in for CONCH
    clip_steps: Positive = 150  # demo CLIP training steps (fixed, so the result does not depend on machine load)
    clip_seconds: PositiveFloat = 600.0  # safety cap on its wall time
    seed: Count = 0  # seed of the generated images, reports and demo CLIP


@dataclass
class DataConfig:
    name: str = "demo"  # dataset reader: demo | pcam | crc | bach | folder
    root: str | None = None  # required for real datasets; the demo generates into <output_dir>/data/images
    # images per split the reader must find (train, val, test). null: the official sizes for pcam, crc and
    # bach, no check for folder and demo. A mapping, for a subset or re-split: checks the splits it names
    # ({} checks none); the class checks stay
    expected_sizes: dict[str, Positive] | None = None
    demo: DemoDataConfig = field(default_factory=DemoDataConfig)


@dataclass
class ReportsConfig:
    path: str | None = None  # required for real corpora; the demo writes <output_dir>/data/reports.jsonl
    format: Literal["auto", "csv", "jsonl", "parquet", "txt"] = "auto"  # auto: from the file suffix
    text_field: str | None = None  # column or field holding the report text; null: text, then report_text
    id_field: str | None = None  # column or field holding the report id; null: id, then patient_filename
    encoding: str = "utf-8"  # text encoding of csv/jsonl/txt corpora (e.g. latin-1, cp1252); never guessed
    organ: str | None = None  # keep reports whose organ contains this word ("breast", "colo")
    projects: Annotated[list[str], Items(min=1)] | None = None  # or TCGA projects, e.g. [BRCA] / [COAD, READ]
    # csv (patient_id,cancer_type) or json mapping TCGA patient barcodes to projects, for corpora without a
    # project column (TCGA_Reports.csv): tcga_patient_to_cancer_type.csv of the same repository
    project_map: str | None = None
    # keep: each text as written (a txt line without its line break, as the reference reads it), so the
    # tokenizer sees the same line breaks and double spaces; collapse: runs of whitespace -> one space
    whitespace: Literal["keep", "collapse"] = "keep"


@dataclass
class PairingConfig:
    model: str = "demo-clip"  # pairing-model registry name: demo-clip | conch | open_clip:<arch> | hf-clip:<name>
    checkpoint: str | None = None  # local weights; the demo CLIP defaults to <output_dir>/demo-clip/
    top_k: Positive = 1  # texts kept per image (shards.use_rank picks among them)
    batch_size: Positive = 256  # images per encoder batch
    device: str = "auto"  # auto | cpu | cuda
    dir: str | None = None  # text-embedding cache and pair indices; default <output_dir>/pairing
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # encoder autocast (GPU); recorded in the identity
    num_workers: Count = 0  # DataLoader workers that decode + preprocess images
    search: Literal["auto", "torch", "faiss"] = "auto"  # exact top-k backend; auto = faiss on CPU for many texts
    texts: Literal["reports", "class_prompts"] = "reports"  # class_prompts: 22 CONCH templates x class names
    # prompt name per class (label order), for class_prompts and the CLIP baselines' prompts; default per dataset
    class_names: Annotated[list[str], Items(min=1)] | None = None
    # a folder of the reference code's pair indices (<dataset>_<split>_indexes.npy, optional _values.npy):
    # `clipit pair` maps them onto this dataset's samples instead of searching (clipit/pairing/reference.py)
    from_reference: str | None = None


@dataclass
class ShardsConfig:
    dir: str | None = None  # default <output_dir>/shards
    samples_per_shard: Positive = 1000  # samples per tar
    use_rank: Positive = (
        1  # which of the top-k texts each image gets (1 = best, at most pairing.top_k; 2..5 = the Fig. 5 ablation)
    )
    random_report_seed: Count | None = None  # set: a uniformly random text per image instead (seeded control)
    # how images are stored: raw (uint8 pixels, no decoding when loading), png (the dataset's encoded bytes as
    # stored, any size), auto (raw for one-size datasets: pcam, crc, bach, demo; png for folder; an existing set keeps its codec)
    codec: Literal["auto", "png", "raw"] = "auto"


@dataclass
class LoraConfig:
    enabled: bool = True  # finetune: auto uses LoRA when enabled
    r: Positive = 16  # LoRA rank
    alpha: Positive = 8  # LoRA scale alpha (update = alpha / r * B A)
    dropout: Fraction = 0.0  # dropout on the LoRA input
    # module types that get adapters, in the backbone and the warm-started head
    targets: Annotated[list[Literal["Linear", "Conv2d", "Embedding"]], Items(min=1, unique=True)] = field(
        default_factory=lambda: ["Linear", "Conv2d", "Embedding"]
    )


@dataclass
class ClipConfig:
    """The CLIP of the CLIP baselines (methods zero_shot, prompt_ft, clip_probe) and their class prompts;
    class names: pairing.class_names (clipit/models/clip_baselines.py)."""

    # pairing-model registry name (conch | open_clip:<arch> | hf-clip:<name> | demo-clip); null = pairing.model
    model: str | None = None
    checkpoint: str | None = (
        None  # its weights, as pairing.checkpoint; null = pairing.checkpoint for the same model, else the weights file
    )
    # prompt templates, each with the word CLASSNAME; null = CONCH's 22 (clipit/pairing/texts.py)
    templates: Annotated[list[str], Items(min=1, unique=True)] | None = None
    logit_scale: PositiveFloat | None = (
        None  # multiplier of the cosine similarities; null = the CLIP's own (exp of its logit_scale)
    )
    learn_logit_scale: bool = False  # prompt_ft also trains the scale (log-parametrised, at most 100 as in CLIP)
    # how the templates of a class combine: embeddings (mean of the L2-normalised prompt embeddings,
    # renormalised, as CONCH's zero-shot) or logits (mean of the per-template logits, the reference code's test)
    ensemble: Literal["embeddings", "logits"] = "embeddings"


@dataclass
class ModelConfig:
    backbone: str = "demo-vit-tiny"  # backbone registry name
    weights: str | None = None  # checkpoint path, hub ID or `random`; None = weights file, then hub (clipit/weights.py)
    weights_file: str | None = None  # YAML name -> checkpoint map (configs/weights.example.yaml); else $CLIPIT_WEIGHTS
    image_size: Side | None = None  # None = the backbone's native input size
    # constructor options of a timm:<model> backbone (e.g. dynamic_img_size: true, img_size: 224); docs/models.md
    timm_kwargs: dict[str, bool | int | float | str | list[int]] = field(default_factory=dict)
    mean: ChannelMeans | None = None  # input normalisation mean per channel; None = the backbone's own
    std: ChannelStds | None = None  # input normalisation std per channel; None = the backbone's own
    lora: LoraConfig = field(default_factory=LoraConfig)
    text_dim: Positive = 512  # dimension of the report embeddings in the shards
    kd_layers: Annotated[int, Range(ge=1, le=2)] = 1  # P is Linear (1) or Linear-LeakyReLU-Linear (2)
    compile: bool = False  # torch.compile the backbone and text tower in place (GPU speed; first steps compile)
    # torch.compile mode with compile: true (reduce-overhead adds CUDA graphs; max-autotune tunes kernels, slow start)
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    # recompute each transformer block's activations in backward (backbone and text tower): less memory for a
    # bigger batch or ViT-L at 448 px, ~30% more compute; an error for a model without block checkpointing
    gradient_checkpointing: bool = False


@dataclass
class TrainConfig:
    # the model kind, a registered method; zero_shot, prompt_ft and clip_probe are the CLIP baselines (section clip)
    method: Annotated[str, OneOf(method_names, "clipit/methods.py")] = "clipit"
    # auto: the method's default (unimodal, clip_probe and zero_shot frozen), else lora if model.lora.enabled
    finetune: Literal["auto", "frozen", "lora", "full"] = "auto"
    epochs: PositiveFloat = 1.0  # passes over the train split (fractions allowed)
    batch_size: Positive = 64  # per process; x processes <= train split size (each sample once per epoch)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"  # the optimizer of every trainable parameter
    lr: PositiveFloat = 1e-3  # peak learning rate
    pretrained_lr: PositiveFloat | None = (
        None  # lr of the pretrained weights under finetune full (new heads, LoRA: lr); None = lr
    )
    weight_decay: NonNegative = 1e-4  # decoupled for adamw, L2 for adam and sgd
    momentum: Fraction = 0.9  # sgd only (> 0 with sgd)
    nesterov: bool = True  # sgd only: Nesterov momentum (the reference's probe); false: plain SGD (kaiko eva's)
    # cosine: from lr to min_lr over the run's steps. cosine_epochs: torch's CosineAnnealingLR(T_max=t_max,
    # eta_min=min_lr) stepped once per epoch, as Lightning steps the reference's probe and text model
    schedule: Literal["none", "cosine", "cosine_epochs"] = "none"
    min_lr: NonNegative = 0.0  # the cosine schedule's floor (at most lr)
    t_max: Positive = 12500  # cosine_epochs: the period in epochs (the reference's T_max)
    grad_clip: NonNegative = 0.5  # max gradient norm (0 = off)
    lam: NonNegative = 1.0  # weight of the cosine distillation term
    # what the cross-entropy reads: logits, or softmax probabilities (the reference code's double softmax)
    ce_input: Literal["logits", "softmax"] = "logits"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # the only precision setting (accelerate + DeepSpeed)
    distributed: Literal["ddp", "zero2"] = "ddp"  # zero2: DeepSpeed ZeRO-2 with a config derived from this one
    checkpoint_every: Count = 0  # steps between resume checkpoints; 0 = at every evaluation
    num_workers: Count = 0  # loader worker processes per rank
    evals_per_epoch: Positive = 1  # validations per epoch
    log_every: Positive = 50  # steps between progress lines on stdout and in <run>/train.log (rank 0)
    # which validation picks best.safetensors (val_acc: accuracy, the score kaiko eva's probe monitors)
    select: Literal["val_loss", "val_bacc", "val_acc", "last"] = "val_loss"
    patience: Count = 0  # stop after this many validations without a better selection score (early stopping); 0 = off
    warm_start: str | None = None  # method whose best checkpoint initialises this one (CLIP-IT: unimodal)
    head_from: str | None = (
        None  # unimodal: import this probe checkpoint's linear head (e.g. kaiko eva's) instead of training
    )
    text_warm_start: str | None = None  # late_fusion: method (text) whose H_t initialises the text branch, same seed
    augment: bool = True  # training augmentation (augment_policy)
    # dihedral: flips and 90-degree rotations (histology has no canonical orientation). flips_jitter: h/v
    # flips + ColorJitter(0.5, 0.5, 0.5, 0.05), the reference's Feb-2025 PCAM loader
    augment_policy: Literal["dihedral", "flips_jitter"] = "dihedral"
    # finetune frozen with a warm start: the warm-started head W_v still trains (the reference's no-LoRA run)
    train_head: bool = False
    # true: a frozen backbone on unaugmented images runs once per image into <shards.dir>/features/ (shared by
    # seeds and methods) and only what follows it trains, on the cached features; false: the backbone runs every step
    feature_cache: bool = True
    # cached: the report embeddings stored in the shards (frozen text side). tower: the pairing model's
    # text tower (pairing.model / pairing.checkpoint) encodes the paired report in every step, with LoRA
    # under finetune lora, inside the same nn.Module as the vision side (the paper's default; CLIP-IT only)
    text_encoder: Literal["cached", "tower"] = "cached"
    word_drop: Fraction = 0.0  # fraction of each report's tokens (between start and end of text) corrupted per step
    word_drop_mode: Literal["mask", "remove"] = "mask"  # mask: a <mask> embedding (reference code); remove: delete
    # prompt_ft's loss: ce (cross-entropy over the prompt-ensemble logits) or infonce (the reference's symmetric
    # InfoNCE, tau 0.07, between the images and their class's first-template prompt; models/losses.py)
    prompt_loss: Literal["ce", "infonce"] = "ce"


TRACKERS = ("tensorboard", "wandb", "mlflow")  # experiment trackers, through accelerate (clipit/training/trackers.py)


@dataclass
class LoggingConfig:
    # where training scalars and hyperparameters go: tensorboard (always: the report's curves read it) plus
    # wandb and/or mlflow (pip install 'clipit[wandb]' / 'clipit[mlflow]'; their own env variables: WANDB_MODE,
    # MLFLOW_TRACKING_URI ...). The W&B project / MLflow experiment is the config's name
    trackers: Annotated[list[Literal["tensorboard", "wandb", "mlflow"]], Items(min=1, unique=True)] = field(
        default_factory=lambda: ["tensorboard"]
    )


@dataclass
class ExperimentConfig:
    name: str = "demo"  # experiment name (labels only)
    output_dir: str = "runs/demo"  # everything the stages write: pairing/, shards/, runs/<method>/seed-<n>/
    seeds: Annotated[list[Count], Items(min=1, unique=True)] = field(
        default_factory=lambda: [0]
    )  # one run per method and seed
    data: DataConfig = field(default_factory=DataConfig)
    reports: ReportsConfig = field(default_factory=ReportsConfig)
    pairing: PairingConfig = field(default_factory=PairingConfig)
    shards: ShardsConfig = field(default_factory=ShardsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    methods: dict[str, TrainConfig] = field(default_factory=dict)  # method name -> its training settings
    logging: LoggingConfig = field(default_factory=LoggingConfig)


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
        expand_paths(config, path)
        check_sections(config, str(path))
        check_methods(config, str(path))
        method_order(config, str(path))  # unknown warm starts and cycles are load errors
        return resolve_paths(config, str(path))
    return config


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def dump_config(config, path: str | Path) -> None:
    """Write the fully resolved config next to a run's outputs (atomic)."""
    from clipit.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(config), sort_keys=False))
