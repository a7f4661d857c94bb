"""`clipit doctor CONFIG`: check, before a job is queued, everything the config needs.

One line per check, printed as it finishes: `✓` passed, `✗` failed (the line says what to fix), `·`
informational. The checks: input paths (data root, report corpus); the inputs exactly as the first
stages read them (clipit/pipeline.py: the dataset reader with its split sizes and classes, the
report corpus with its fields, encoding and filters, the texts pairing searches), so a config that
passes here does not fail at the first step of `clipit pair`, and one that fails gets the same
message `clipit pair` would print; the weights file, every backbone weight the methods need (found,
strict load, output width as declared), the pairing model's weights (found, loads, embedding width
= model.text_dim), the shard manifest (embedding width = model.text_dim), and the methods'
warm-start references. Exit status 0 when nothing failed, 2 otherwise. Which check runs now is
shown on stderr (a bar on a terminal, a `[i/n] what` line otherwise: clipit/progress.py), because
loading a dataset or a backbone can take minutes. `clipit doctor GRID`, `clipit grid` and `clipit
prepare` run these checks over every distinct config of a grid's cells (clipit/hpc/preflight.py).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from clipit.config import ExperimentConfig
from clipit.demo_inputs import PREPARE, check_demo_images, pending
from clipit.errors import ClipitError, one_line
from clipit.methods import method_spec
from clipit.progress import Progress

OK, FAIL, INFO, WARN = "✓", "✗", "·", "!"  # WARN: runs, but probably not as meant


@dataclass
class Check:
    status: str  # OK | FAIL | INFO | WARN
    what: str
    detail: str

    def line(self) -> str:
        return f"{self.status} {self.what}: {self.detail}"


def _to_prepare(path: str) -> str:
    return f"{path}: not prepared yet; `{PREPARE}` makes it (`clipit demo`, `pair` and `shard build` run it first)"


def _demo_images_changed(cfg: ExperimentConfig) -> str | None:
    """The line the stages stop with when the demo images on disk were generated with other settings."""
    try:
        check_demo_images(cfg)
    except ClipitError as err:
        return one_line(err, limit=2000)
    return None


def check_paths(cfg: ExperimentConfig) -> list[Check]:
    out = []
    waiting = pending(cfg)
    for what, key, value in [("data", "data.root", cfg.data.root), ("reports", "reports.path", cfg.reports.path)]:
        if key in waiting and (changed := _demo_images_changed(cfg) if key == "data.root" else None):
            out.append(Check(FAIL, what, changed))  # what `clipit prepare demo` (and pair) would stop with
        elif key in waiting:
            out.append(Check(INFO, what, _to_prepare(value)))
        elif value and Path(value).exists():
            out.append(Check(OK, what, f"{value} exists"))
        else:
            # the paper configs' TCGA csv is made once by `clipit prepare reports` (docs/reproduce.md)
            made_by = (
                " (or make it: `clipit prepare reports`)"
                if key == "reports.path" and str(value).endswith(".csv")
                else ""
            )
            out.append(Check(FAIL, what, f"{value} not found; fix {key}{made_by}"))
    return out


def _sizes(dataset) -> str:
    return ", ".join(f"{s} {dataset.split_size(s):,}" for s in dataset.splits)


def check_inputs(cfg: ExperimentConfig, echo: Callable[[str], None] | None = None) -> list[Check]:
    """The dataset, the corpus and the pairing texts, built by the functions `clipit pair` calls first.

    Inputs that `clipit prepare demo` has still to make are not read (doctor writes nothing); what
    exists is read by the same readers as every dataset's. A missing data.root or reports.path is
    already a ✗ or · of check_paths."""
    from clipit.pipeline import build_image_dataset, load_corpus, pairing_inputs

    waiting = pending(cfg)
    if echo:
        echo(f"· dataset: reading {cfg.data.name} at {cfg.data.root} ...")
    out: list[Check] = []
    dataset = reports = None
    if Path(cfg.data.root).exists() and "data.root" not in waiting:
        try:
            dataset = build_image_dataset(cfg)
            out.append(Check(OK, "dataset", f"{cfg.data.name}: {_sizes(dataset)}; {len(dataset.classes)} classes"))
        except ClipitError as err:
            out.append(Check(FAIL, "dataset", one_line(err, limit=2000)))
    if Path(cfg.reports.path).exists() and "reports.path" not in waiting:
        try:
            reports = load_corpus(cfg)
            r = cfg.reports
            kept = (
                ""
                if r.organ is None and r.projects is None
                else f" after the filters (organ {r.organ!r}, projects {r.projects})"
            )
            out.append(Check(OK, "corpus", f"{len(reports):,} reports{kept}"))
        except ClipitError as err:
            out.append(Check(FAIL, "corpus", one_line(err, limit=2000)))
    if dataset is not None and reports is not None:
        try:
            texts = pairing_inputs(cfg, dataset, reports)
            kind = "class prompts" if cfg.pairing.texts == "class_prompts" else "reports"
            out.append(Check(OK, "pairing texts", f"{len(texts):,} {kind}, top {cfg.pairing.top_k} kept per image"))
        except ClipitError as err:
            out.append(Check(FAIL, "pairing texts", one_line(err, limit=2000)))
    return out


def check_weights_file(cfg: ExperimentConfig) -> list[Check]:
    from clipit.weights import WeightsError, read_weights_file, weights_file_path

    file = weights_file_path(cfg.model.weights_file)
    if file is None:
        return [Check(INFO, "weights file", "none (set model.weights_file or $CLIPIT_WEIGHTS to use one)")]
    try:
        entries = read_weights_file(file, cfg.model.weights_file)
    except WeightsError as err:
        return [Check(FAIL, "weights file", one_line(err))]
    return [Check(OK, "weights file", f"{file} ({len(entries)} entries)")]


def check_backbone(cfg: ExperimentConfig) -> list[Check]:
    from clipit.config import ConfigError
    from clipit.models.backbones import BackboneError, build_backbone, get_spec, resolve_weights

    users = sorted(name for name, t in cfg.methods.items() if method_spec(t.method).vision is not None)
    if not users:
        return []
    name = cfg.model.backbone
    what = f"backbone {name}"
    try:
        spec = get_spec(name, cfg.model.timm_kwargs)
        source = resolve_weights(name, cfg.model.weights, cfg.model.weights_file)
    except (BackboneError, ConfigError) as err:
        return [Check(FAIL, what, one_line(err))]
    checks = [Check(OK, what, f"weights {source}, used by {', '.join(users)}")]
    try:
        model, spec = build_backbone(name, source, cfg.model.image_size, cfg.model.weights_file, cfg.model.timm_kwargs)
    except (BackboneError, ConfigError) as err:
        return checks + [Check(FAIL, what, one_line(err))]
    if source.kind != "random":
        checks.append(Check(OK, what, "strict load: every tensor of the checkpoint fits"))
    size = cfg.model.image_size or spec.input_size
    with torch.no_grad():
        try:
            width = int(model.eval()(torch.zeros(1, 3, size, size)).shape[-1])
        except Exception as err:  # a wrong image_size for a fixed-size model, etc.
            return checks + [Check(FAIL, what, f"forward at {size} px fails: {one_line(err)}")]
    declared = spec.dim if spec.dim is not None else model.num_features
    if width != declared or width != model.num_features:
        checks.append(
            Check(
                FAIL,
                what,
                f"output width {width}, declared {declared} (num_features "
                f"{model.num_features}); the checkpoint or registry entry is wrong",
            )
        )
    else:
        checks.append(Check(OK, what, f"output width {width} at {size} px, as declared"))
    patch = patch_size(model)
    if patch and size % patch:
        used = size // patch * patch
        checks.append(
            Check(
                WARN,
                what,
                f"{size} px is not a multiple of its {patch}-px patches: the last {size - used} rows and columns "
                f"of every image are never seen; set model.image_size to {used} or {used + patch}",
            )
        )
    return checks


def patch_size(model: torch.nn.Module) -> int | None:
    """The patch side of a ViT-style backbone (timm's patch_embed.patch_size), None for other models."""
    for module in model.modules():
        size = getattr(getattr(module, "patch_embed", None), "patch_size", None)
        if size:
            return int(size[0] if isinstance(size, (tuple, list)) else size)
    return None


def check_pairing(cfg: ExperimentConfig, shards_built: bool) -> list[Check]:
    from clipit.pairing.encoders import PairingModelError, build_pairing_model
    from clipit.weights import WeightsError, resolve_pairing_checkpoint

    name = cfg.pairing.model
    what = f"pairing model {name}"
    tower = sorted(m for m, t in cfg.methods.items() if t.text_encoder == "tower")
    optional = shards_built and not tower  # built shards no longer need the pairing model, unless it trains
    fail = INFO if optional else FAIL
    after = " (shards are built, so only a re-pairing needs it)" if optional else ""
    if tower:
        what += f" (text tower of {', '.join(tower)})"
    if "pairing.checkpoint" in pending(cfg):
        return [Check(INFO, what, _to_prepare(cfg.pairing.checkpoint))]
    try:
        checkpoint = resolve_pairing_checkpoint(name, cfg.pairing.checkpoint, cfg.model.weights_file)
    except WeightsError as err:
        return [Check(fail, what, one_line(err) + after)]
    if checkpoint is None:
        return [
            Check(
                fail,
                what,
                f"no weights: set pairing.checkpoint or add `{name}: /path/to/checkpoint` to a "
                f"weights file (model.weights_file or $CLIPIT_WEIGHTS){after}",
            )
        ]
    try:
        model = build_pairing_model(name, checkpoint, "cpu")
        dim = model.embed_dim
    except (PairingModelError, OSError, RuntimeError) as err:
        return [Check(fail, what, one_line(err) + after)]
    checks = [Check(OK, what, f"{checkpoint} loads")]
    if dim != cfg.model.text_dim:
        checks.append(
            Check(FAIL, what, f"embeds into {dim}-d, model.text_dim is {cfg.model.text_dim}; fix model.text_dim")
        )
    else:
        checks.append(Check(OK, what, f"embedding width {dim} = model.text_dim"))
    return checks


def check_shards(cfg: ExperimentConfig) -> tuple[list[Check], bool]:
    from clipit.shards.manifest import MANIFEST, ShardError, load_manifest
    from clipit.shards.order import require_shuffled_train

    path = Path(cfg.shards.dir) / MANIFEST
    if not path.exists():
        return [Check(INFO, "shards", f"not built yet ({path}); `clipit shard build` builds them")], False
    try:
        manifest = load_manifest(cfg.shards.dir)
        dim = int(manifest["embedding"]["dim"])
    except (ShardError, KeyError, ValueError, OSError) as err:
        return [Check(FAIL, "shards", f"{path}: unreadable manifest ({one_line(err)})")], True
    counts = ", ".join(f"{s} {v['count']}" for s, v in manifest.get("splits", {}).items())
    if dim != cfg.model.text_dim:
        return [
            Check(
                FAIL,
                "shards",
                f"{path}: report embeddings are {dim}-d but model.text_dim is "
                f"{cfg.model.text_dim}; fix model.text_dim or rebuild the shards",
            )
        ], True
    try:
        require_shuffled_train(cfg.shards.dir, manifest)
    except ShardError as err:
        return [Check(FAIL, "shards", str(err))], True
    return [
        Check(
            OK, "shards", f"{len(manifest.get('classes', []))} classes, {counts}; embeddings {dim}-d = model.text_dim"
        )
    ], True


def check_methods(cfg: ExperimentConfig) -> list[Check]:
    if not cfg.methods:
        return [Check(FAIL, "methods", "the config defines no methods")]
    out = []
    for name, t in cfg.methods.items():  # warm-start names and cycles were checked when the config loaded
        mode = method_spec(t.method).finetune_shown(t.finetune, cfg.model.lora.enabled)
        warm = (f", warm start {t.warm_start}" if t.warm_start else "") + (
            f", text warm start {t.text_warm_start}" if t.text_warm_start else ""
        )
        text = ""
        if t.text_encoder == "tower":
            text = ", text tower" + (f" with {t.word_drop:.0%} word drop ({t.word_drop_mode})" if t.word_drop else "")
        out.append(Check(OK, f"method {name}", f"{t.method}, fine-tuning {mode}{warm}{text}"))
        if t.head_from and not Path(t.head_from).is_file():
            out.append(Check(FAIL, f"method {name}", f"methods.{name}.head_from: {t.head_from} not found"))
    return out


def _print(line: str) -> None:
    print(line, flush=True)  # each check shows up as it finishes, also when stdout is a pipe or a log file


def run_doctor(cfg: ExperimentConfig, echo: Callable[[str], None] = _print) -> int:
    """Run every check, print one line each; returns the exit status (0 ok, 2 problems)."""
    shard_checks, shards_built = check_shards(cfg)
    groups = {
        "input paths": lambda: check_paths(cfg),
        "inputs": lambda: check_inputs(cfg, echo),
        "weights file": lambda: check_weights_file(cfg),
        "methods": lambda: check_methods(cfg),
        "backbone": lambda: check_backbone(cfg),
        "pairing model": lambda: check_pairing(cfg, shards_built),
        "shards": lambda: shard_checks,
    }
    failed = 0
    with Progress(total=len(groups), desc="clipit doctor", unit="check", every=len(groups)) as bar:
        if echo is _print:
            echo = bar.write  # lines above a terminal's bar instead of through it
        for what, group in groups.items():
            bar.note(what)
            for check in group():
                echo(check.line())
                failed += check.status == FAIL
            bar.update()
    if failed:
        print(f"clipit doctor: {failed} problem(s); fix the ✗ lines above", file=sys.stderr)
        return 2
    echo("all checks passed")
    return 0
