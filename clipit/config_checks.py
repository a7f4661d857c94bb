"""The rules load_config applies to a parsed config, after the types and ranges (clipit/config.py).

Paths get `${VAR}`, `${CONFIG_DIR}` and `~` expanded, settings that only make sense together are
checked across sections and methods (each error names the key and the fix), the warm starts must form
an order without unknown names or cycles, and stage paths left empty are filled from output_dir.
"""

from __future__ import annotations

import codecs
from pathlib import Path
from typing import TYPE_CHECKING

from clipit.errors import ConfigError
from clipit.layout import check_name
from clipit.methods import method_names, method_spec
from clipit.typed_yaml import expand_path

if TYPE_CHECKING:  # annotations only: clipit.config imports this module to run the rules at load
    from clipit.config import ExperimentConfig, ModelConfig

# set by clipit itself (weights through model.weights, a headless backbone)
TIMM_RESERVED = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "num_classes")


def check_timm_kwargs(model: ModelConfig, where: str) -> None:
    options = model.timm_kwargs
    if not options:
        return
    if not model.backbone.startswith("timm:"):
        raise ConfigError(
            f"{where}: model.timm_kwargs is for timm:<model> backbones; {model.backbone!r} is built as the "
            "registry defines it: remove model.timm_kwargs or use backbone timm:<model>"
        )
    reserved = [k for k in options if k in TIMM_RESERVED]
    if reserved:
        raise ConfigError(
            f"{where}: model.timm_kwargs.{reserved[0]} is set by clipit itself; remove it (weights: model.weights)"
        )
    size = options.get("img_size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int | list)):
        raise ConfigError(f"{where}: model.timm_kwargs.img_size = {size!r} must be pixels, e.g. 224")
    if isinstance(size, int) and model.image_size not in (None, size):
        raise ConfigError(
            f"{where}: model.timm_kwargs.img_size = {size} disagrees with model.image_size = {model.image_size}; "
            "set one of them"
        )


def check_sections(cfg: ExperimentConfig, where: str = "<config>") -> None:
    """Settings of the data, reports, pairing and shards sections that only make sense together."""
    s, p = cfg.shards, cfg.pairing
    check_timm_kwargs(cfg.model, where)
    if s.random_report_seed is None and s.use_rank > p.top_k:
        raise ConfigError(
            f"{where}: shards.use_rank = {s.use_rank} needs pairing.top_k >= {s.use_rank} (it is "
            f"{p.top_k}); raise pairing.top_k or lower shards.use_rank"
        )
    try:
        codecs.lookup(cfg.reports.encoding)
    except LookupError:
        raise ConfigError(
            f"{where}: reports.encoding = {cfg.reports.encoding!r} is not a text encoding Python "
            "knows; use e.g. utf-8, latin-1 or cp1252"
        ) from None
    if "tensorboard" not in cfg.logging.trackers:
        raise ConfigError(
            f"{where}: logging.trackers = {cfg.logging.trackers} lacks tensorboard, which the report's training "
            "curves read; list wandb or mlflow next to it, e.g. [tensorboard, wandb]"
        )
    if p.from_reference is not None:
        check_reference_pairing(cfg, where)
    if (cfg.model.mean is None) != (cfg.model.std is None):
        raise ConfigError(f"{where}: set model.mean and model.std together (or neither: the backbone's own)")
    for i, template in enumerate(cfg.clip.templates or ()):
        if "CLASSNAME" not in template:
            raise ConfigError(
                f"{where}: clip.templates[{i}] = {template!r} has no CLASSNAME (where the class name "
                "goes); write e.g. 'an H&E image of CLASSNAME.'"
            )


def check_reference_pairing(cfg: ExperimentConfig, where: str) -> None:
    """pairing.from_reference holds top-1 indices into the reference's one-report-per-line files."""
    r, p = cfg.reports, cfg.pairing
    fmt = r.format if r.format != "auto" else ("txt" if str(r.path or "").lower().endswith(".txt") else r.format)
    problems = [
        (p.top_k != 1, "pairing.top_k: 1 (the reference kept the top-1 report only)"),
        (p.texts != "reports", "pairing.texts: reports"),
        (
            fmt != "txt",
            "reports.path: the reference's report file (text/text_breast.txt, text_colo.txt) read as format txt",
        ),
        (r.organ is not None or r.projects is not None, "no reports.organ / reports.projects (the file is the corpus)"),
        (
            cfg.data.name not in ("pcam", "crc", "bach"),
            "data.name pcam, crc or bach (the datasets the reference paired)",
        ),
    ]
    for bad, need in problems:
        if bad:
            raise ConfigError(f"{where}: pairing.from_reference needs {need}")


def check_methods(cfg: ExperimentConfig, where: str = "<config>") -> None:
    """Settings that only make sense together (each error names the key and the fix); what a method
    admits is its spec's (clipit/methods.py)."""
    towers = " or ".join(n for n in method_names() if method_spec(n).text_tower)
    probes = " or ".join(n for n in method_names() if method_spec(n).imports_head)
    for name, m in cfg.methods.items():
        key = f"methods.{name}"
        check_name(name, f"{where}: {key}: method name")
        spec = method_spec(m.method, f"{where}: {key}.method")
        hint = f", {spec.hint}" if spec.hint else ""
        if spec.uses_clip and (m.warm_start or m.text_warm_start):
            raise ConfigError(
                f"{where}: {key}: method {m.method} starts from the CLIP (section clip), not from "
                "another run; remove warm_start / text_warm_start"
            )
        if not spec.trains and m.finetune not in ("auto", "frozen"):
            raise ConfigError(
                f"{where}: {key}.finetune = {m.finetune!r}: {m.method} trains nothing; use finetune: auto{hint}"
            )
        if spec.towers_only and spec.finetune(m.finetune, cfg.model.lora.enabled) == "frozen":
            raise ConfigError(
                f"{where}: {key}: {m.method} with frozen towers trains nothing; set finetune: lora "
                f"(or full), or model.lora.enabled: true{hint}"
            )
        if m.text_warm_start and not m.warm_start:
            raise ConfigError(
                f"{where}: {key}.text_warm_start = {m.text_warm_start!r} needs warm_start too (the text "
                "run is found next to the warm-start run of the same seed)"
            )
        if m.text_encoder == "tower" and not spec.text_tower:
            raise ConfigError(
                f"{where}: {key}.text_encoder: tower is for method {towers} (got {m.method!r}); use text_encoder: cached"
            )
        if m.text_encoder == "tower" and m.lam == 0:
            raise ConfigError(
                f"{where}: {key}.text_encoder: tower needs lam > 0 (with lam 0 the tower gets no "
                "gradient and DDP fails on its unused parameters); use text_encoder: cached"
            )
        if m.word_drop and m.text_encoder != "tower":
            raise ConfigError(
                f"{where}: {key}.word_drop needs text_encoder: tower (cached embeddings have no words to drop)"
            )
        if m.pretrained_lr is not None and m.finetune != "full":
            raise ConfigError(
                f"{where}: {key}.pretrained_lr is for finetune: full (got finetune {m.finetune!r}: the "
                "pretrained weights do not train); remove pretrained_lr or set finetune: full"
            )
        if m.prompt_loss != "ce" and not spec.trains_prompts:
            prompts = " or ".join(n for n in method_names() if method_spec(n).trains_prompts)
            raise ConfigError(
                f"{where}: {key}.prompt_loss is for method {prompts} (got {m.method!r}); remove prompt_loss"
            )
        if m.head_from and not spec.imports_head:
            raise ConfigError(
                f"{where}: {key}.head_from imports a linear probe, so it is for method {probes} (got "
                f"{m.method!r}); remove it, or warm-start this method from a {probes} method that has it"
            )
        if m.patience and m.select == "last":
            raise ConfigError(
                f"{where}: {key}.patience needs a validation score to watch (select is 'last'); set "
                "select: val_bacc or val_loss, or patience: 0"
            )
        if m.train_head and not (m.warm_start and spec.finetune(m.finetune, cfg.model.lora.enabled) == "frozen"):
            raise ConfigError(
                f"{where}: {key}.train_head is for a frozen backbone with a warm-started head (finetune: frozen, "
                "or model.lora.enabled: false, and warm_start); remove train_head"
            )
        if m.optimizer == "sgd" and m.nesterov and m.momentum == 0:
            raise ConfigError(
                f"{where}: {key}.momentum = 0 with optimizer sgd: Nesterov SGD needs momentum in "
                "(0, 1); set momentum (e.g. 0.9), nesterov: false, or use optimizer adam"
            )
        if m.schedule != "none" and m.min_lr > m.lr:
            raise ConfigError(
                f"{where}: {key}.min_lr = {m.min_lr:g} is above lr = {m.lr:g}; the cosine schedule "
                "decays from lr to min_lr, so set min_lr <= lr"
            )


def method_order(cfg: ExperimentConfig, where: str = "<config>") -> list[str]:
    """Methods sorted so that each warm start is trained before the method that needs it."""
    order: list[str] = []

    def visit(name: str, trail: tuple = ()):
        if name in order:
            return
        if name not in cfg.methods:
            raise ConfigError(
                f"{where}: methods.{trail[-1]} warm-starts from unknown method {name!r}; known: {sorted(cfg.methods)}"
            )
        if name in trail:
            raise ConfigError(
                f"{where}: warm_start cycle: {' -> '.join(trail + (name,))}; remove one of these warm_start settings"
            )
        for dependency in (cfg.methods[name].warm_start, cfg.methods[name].text_warm_start):
            if dependency:
                visit(dependency, trail + (name,))
        order.append(name)

    for name in cfg.methods:
        visit(name)
    return order


# Keys that hold file system paths: `${VAR}` (an environment variable) and `${CONFIG_DIR}` (the folder
# of the config file) are expanded in them at load time, and `~` to the home folder. Relative paths
# stay relative to the working directory of the command (the one rule; docs/config.md).
PATH_KEYS = (
    "output_dir",
    "data.root",
    "reports.path",
    "reports.project_map",
    "pairing.dir",
    "pairing.checkpoint",
    "pairing.from_reference",
    "shards.dir",
    "model.weights",
    "model.weights_file",
)


def expand_paths(cfg: ExperimentConfig, path: Path) -> None:
    config_dir = Path(path).parent.absolute()
    for key in PATH_KEYS:
        *parents, leaf = key.split(".")
        node = cfg
        for part in parents:
            node = getattr(node, part)
        value = getattr(node, leaf)
        if isinstance(value, str):
            setattr(node, leaf, expand_path(value, key, str(path), config_dir))
    for name, m in cfg.methods.items():
        if m.head_from:
            m.head_from = expand_path(m.head_from, f"methods.{name}.head_from", str(path), config_dir)


def resolve_paths(cfg: ExperimentConfig, where: str = "<config>") -> ExperimentConfig:
    """Fill stage paths left empty from output_dir, so each location is written down once."""
    out = Path(cfg.output_dir)
    cfg.pairing.dir = cfg.pairing.dir or str(out / "pairing")
    cfg.shards.dir = cfg.shards.dir or str(out / "shards")
    if cfg.data.name == "demo":
        cfg.data.root = cfg.data.root or str(out / "data" / "images")
        cfg.reports.path = cfg.reports.path or str(out / "data" / "reports.jsonl")
    if cfg.pairing.model == "demo-clip":  # made by `clipit prepare demo` (clipit/demo_inputs.py), any dataset
        cfg.pairing.checkpoint = cfg.pairing.checkpoint or str(out / "demo-clip" / "model.safetensors")
    for key, value in [("data.root", cfg.data.root), ("reports.path", cfg.reports.path)]:
        if value is None:
            raise ConfigError(f"{where}: {key} is required for dataset {cfg.data.name!r}")
    return cfg
