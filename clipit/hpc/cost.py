"""What a grid costs before it is launched (`clipit grid --dry-run`): the samples each stage passes through
a backbone or text tower, and the GPU-hours that takes, with and without the frozen-feature cache.

Counts (exact, from the configs and the split sizes):
  pairing (once per pairing.dir)  every image of every split through the pairing model's image encoder
                                  (CONCH: 448 px) + every text of the corpus through its text encoder
  a method's cell                 train: total_steps x batch_size x world (the trainer's step plan);
                                  validation: validations x val count; test: the test count. With
                                  text_encoder: tower each train and val sample's report also goes
                                  through the text tower (the worst case: a batch encodes each distinct
                                  report once). What runs the images and whether anything trains is
                                  the method's spec (clipit/methods.py: vision, trains).
  with the feature cache          a cell that trains on cached features (training/features.py
                                  uses_feature_cache) has no train or val pass of its own: one pass over
                                  the cached splits per cache (shard set, backbone, weights, input size,
                                  precision) is shared by its seeds and methods, charged to the first cell
                                  that builds it; the test pass stays per cell.
  `clipit reproduce` stage 4       per Table 1 cell (clipit/hpc/frozen_stage.py) the test split through its
                                  backbone, and the train split once per feature cache: one per frozen
                                  backbone (the probe's seeds share it), one per run for a tuned backbone
                                  (CLIP-IT); a cache its training built already is charged again
Split sizes: data.expected_sizes, else the dataset's official sizes (the data registry), else the shard
manifest, else data.demo.counts for the demo. Seconds per sample: clipit/hpc/throughput.py. Early
stopping (patience) is not foreseen: the numbers are upper bounds.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path

from clipit.config import ConfigError, ExperimentConfig
from clipit.hpc.throughput import ASSUMED_REPORTS, Throughput, backbone_flops, pairing_flops
from clipit.methods import method_spec


@dataclass(frozen=True)
class Pass:
    """`samples` samples through one model part (`key`, see Throughput.seconds) in one pass kind."""

    key: str
    samples: int
    kind: str  # forward | lora | full
    precision: str
    flops: float  # forward FLOPs per sample
    images: bool = True  # decoded images (the loader's rate bounds it); False: text tokens


@dataclass
class StageCost:
    label: str
    online: list[Pass] = field(default_factory=list)  # feature cache off
    cached: list[Pass] = field(default_factory=list)  # feature cache on (where a stage can use it)

    def images(self, cached: bool) -> int:
        return sum(p.samples for p in (self.cached if cached else self.online) if p.images)

    def texts(self, cached: bool) -> int:
        return sum(p.samples for p in (self.cached if cached else self.online) if not p.images)

    def gpu_hours(self, throughput: Throughput, cached: bool) -> float:
        return (
            sum(
                p.samples * throughput.seconds(p.key, p.flops, p.kind, p.precision, p.images)
                for p in (self.cached if cached else self.online)
            )
            / 3600
        )


def split_counts(cfg: ExperimentConfig) -> dict[str, int]:
    """Images per split the stages will see (see the module docstring for the order of sources)."""
    if cfg.data.name == "demo":
        return dict(cfg.data.demo.counts) | dict(cfg.data.expected_sizes or {})
    from clipit.data.registry import DATASETS

    factory = DATASETS.get(str(cfg.data.name).lower())
    official = {}
    if factory is not None and "expected_sizes" in inspect.signature(factory).parameters:
        official = dict(inspect.signature(factory).parameters["expected_sizes"].default or {})
    counts = official | dict(cfg.data.expected_sizes or {})
    manifest = Path(cfg.shards.dir or "") / "manifest.json"
    if len(counts) < 3 and manifest.is_file():
        try:
            counts = {s: int(v["count"]) for s, v in json.loads(manifest.read_text())["splits"].items()} | counts
        except (OSError, ValueError, KeyError, TypeError):
            pass
    missing = [s for s in ("train", "val", "test") if s not in counts]
    if missing:
        raise ConfigError(
            f"data.expected_sizes: the cost of dataset {cfg.data.name!r} needs the size of split(s) "
            f"{missing}; set data.expected_sizes: {{train: N, val: N, test: N}} or build the shards first"
        )
    return counts


def report_count(cfg: ExperimentConfig) -> int:
    """Texts the pairing stage encodes: the filtered corpus when it is readable now, else ASSUMED_REPORTS."""
    if cfg.pairing.texts == "class_prompts":
        return 22 * len(cfg.pairing.class_names or [None] * 10)
    if cfg.data.name == "demo":
        return cfg.data.demo.n_reports
    try:
        from clipit.pipeline import load_corpus

        return len(load_corpus(cfg))
    except Exception:
        return ASSUMED_REPORTS


def pairing_stage(cfg: ExperimentConfig, counts: dict[str, int]) -> StageCost:
    image_flops, text_flops = pairing_flops(cfg.pairing.model)
    model, precision = cfg.pairing.model, cfg.pairing.precision
    passes = [
        Pass(f"pairing:{model}", sum(counts.values()), "forward", precision, image_flops),
        Pass(f"tower:{model}", report_count(cfg), "forward", precision, text_flops, images=False),
    ]
    return StageCost(f"pairing {cfg.pairing.dir} ({model})", passes, passes)


def method_stage(
    cfg: ExperimentConfig, method: str, counts: dict[str, int], world: int, label: str
) -> tuple[StageCost, tuple | None, list[Pass]]:
    """The cell's cost, the key of the feature cache it trains on (None: online) and that cache's build."""
    from clipit.training.feature_files import SPLITS
    from clipit.training.features import uses_feature_cache
    from clipit.training.trainer import step_plan

    tcfg = cfg.methods[method]
    spec = method_spec(tcfg.method)  # its cost model: what runs the images, whether it trains
    stage = StageCost(label)
    if spec.vision is None:  # e.g. report embedding -> MLP: no backbone, no tower
        return stage, None, []
    if spec.uses_clip:
        clip_model = cfg.clip.model or cfg.pairing.model
        key, flops, size = f"pairing:{clip_model}", pairing_flops(clip_model)[0], None
    else:
        key, size = cfg.model.backbone, cfg.model.image_size
        flops = backbone_flops(cfg.model.backbone, size)
    precision = tcfg.precision
    test = Pass(key, counts["test"], "forward", precision, flops)
    if not spec.trains:  # saved as built: the test split alone
        stage.online = stage.cached = [test]
        return stage, None, []
    plan = step_plan({"splits": {"train": {"count": counts["train"]}}}, tcfg, world)
    validations = plan.total_steps // plan.eval_every + (1 if plan.total_steps % plan.eval_every else 0)
    trained = plan.total_steps * tcfg.batch_size * world
    finetune = spec.finetune(tcfg.finetune, cfg.model.lora.enabled)
    kind = {"frozen": "forward", "lora": "lora", "full": "full"}[finetune]
    stage.online = [
        Pass(key, trained, kind, precision, flops),
        Pass(key, validations * counts["val"], "forward", precision, flops),
        test,
    ]
    if tcfg.text_encoder == "tower":
        text_flops = pairing_flops(cfg.pairing.model)[1]
        tower = f"tower:{cfg.pairing.model}"
        stage.online += [
            Pass(tower, trained, kind, precision, text_flops, images=False),
            Pass(tower, validations * counts["val"], "forward", precision, text_flops, images=False),
        ]
    if not uses_feature_cache(cfg, method):
        stage.cached = list(stage.online)
        return stage, None, []
    cache_key = frozen_backbone_cache(cfg, key, size, precision)
    build = [Pass(key, counts[s], "forward", precision, flops) for s in SPLITS]
    stage.cached = [] if "test" in SPLITS else [test]
    return stage, cache_key, build


def frozen_backbone_cache(cfg: ExperimentConfig, key: str, size, precision: str) -> tuple:
    """What tells one frozen backbone's feature cache from another's in the cost (shard set, backbone,
    weights, input size, precision): cells with the same one share its build."""
    return (cfg.shards.dir, key, cfg.model.weights, size, precision)


def cell_configs(cells) -> dict:
    """Each distinct (config, overrides) of `cells` loaded once: cells differing only by method or seed share it."""
    configs: dict = {}
    for cell in cells:
        key = (cell.config, cell.overrides)
        if key not in configs:
            configs[key] = cell.load()
    return configs


def grid_cost(plan, world: int = 1) -> list[StageCost]:
    """Pairing stages (one per pairing.dir) and every cell of an expanded grid (clipit.hpc.grid.Plan)."""
    stages, seen_pairing, built = [], set(), set()
    configs = cell_configs(plan.cells)
    for cell in plan.cells:
        cfg = configs[(cell.config, cell.overrides)]
        counts = split_counts(cfg)
        if cfg.pairing.dir not in seen_pairing:
            seen_pairing.add(cfg.pairing.dir)
            stages.append(pairing_stage(cfg, counts))
        stage, cache, build = method_stage(cfg, cell.method, counts, world, cell.key)
        if cache is not None and cache not in built:
            built.add(cache)
            stage.cached = build + stage.cached
            stage.label += " +cache build"
        stages.append(stage)
    return stages


def cost_lines(stages: list[StageCost], throughput: Throughput) -> list[str]:
    """The dry-run's cost table: per stage and in total, images and texts through the models and GPU-hours,
    without and with the feature cache."""
    head = f"{'stage':<64} {'images':>13} {'images+cache':>13} {'texts':>11} {'GPU-h':>9} {'GPU-h+cache':>11}"
    lines = [f"cost before launch (throughput {throughput.source})", head]
    total = [0, 0, 0, 0.0, 0.0]
    for s in stages:
        row = [
            s.images(False),
            s.images(True),
            s.texts(False),
            s.gpu_hours(throughput, False),
            s.gpu_hours(throughput, True),
        ]
        total = [a + b for a, b in zip(total, row)]
        lines.append(_row(s.label, row))
    lines.append(_row(f"total ({len(stages)} stages)", total))
    return lines


def _row(label: str, row: list) -> str:
    label = label if len(label) <= 64 else label[:61] + "..."
    return f"{label:<64} {row[0]:>13,} {row[1]:>13,} {row[2]:>11,} {row[3]:>9.2f} {row[4]:>11.2f}"


def frozen_eval_stage(cells) -> StageCost:
    """`clipit reproduce`'s stage 4 over its cells (clipit.hpc.grid_cell.Cell): see the module docstring."""
    stage, caches, configs = StageCost("stage 4 frozen features (k-NN, few-shot)"), set(), cell_configs(cells)
    for cell in cells:
        cfg = configs[(cell.config, cell.overrides)]
        counts, tcfg = split_counts(cfg), cfg.methods[cell.method]
        backbone, size = cfg.model.backbone, cfg.model.image_size
        flops = backbone_flops(backbone, size)
        stage.online.append(Pass(backbone, counts["test"], "forward", tcfg.precision, flops))
        frozen = method_spec(tcfg.method).finetune(tcfg.finetune, cfg.model.lora.enabled) == "frozen"
        cache = frozen_backbone_cache(cfg, backbone, size, tcfg.precision) if frozen else cell.run_dir
        if cache not in caches:
            caches.add(cache)
            stage.online.append(Pass(backbone, counts["train"], "forward", tcfg.precision, flops))
    stage.cached = stage.online
    return stage
