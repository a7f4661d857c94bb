"""The stages in order, each skipping work whose output already exists:
reports -> pairing -> shards -> training (per method and seed) -> evaluation -> summary table.

Pairing and shards run in this process; each training cell (train + evaluate of one method and
seed) runs in a process of its own (clipit/cells.py).
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np

from clipit import layout
from clipit.cells import ChainCell, ConfigSource, cell_argv, chain_error, run_chain
from clipit.config import ConfigError, ExperimentConfig
from clipit.config_checks import method_order
from clipit.corpus import Report
from clipit.corpus_reader import load_reports
from clipit.data.base import DatasetError, ImageDataset
from clipit.demo_inputs import prepare_demo_clip, prepare_demo_data
from clipit.identity import OVERWRITE
from clipit.io import atomic_write_json, atomic_write_text, read_json
from clipit.reruns import cells_to_run


def build_image_dataset(cfg: ExperimentConfig) -> ImageDataset:
    """The config's image dataset, its split sizes checked against `data.expected_sizes`: readers with
    official sizes (pcam, crc, bach) take them in place of their own; for the others (folder, demo)
    the sizes are checked here once the dataset is listed."""
    from clipit.data.registry import DATASETS, build_dataset, check_split_names

    expected = cfg.data.expected_sizes
    factory = DATASETS.get(str(cfg.data.name).lower())
    takes_sizes = factory is not None and "expected_sizes" in inspect.signature(factory).parameters
    if factory is not None:
        check_split_names(expected, tuple(getattr(factory, "splits", ImageDataset.splits)))
    options = {"expected_sizes": expected} if takes_sizes and expected is not None else {}
    dataset = build_dataset(cfg.data.name, cfg.data.root, **options)
    if not takes_sizes:
        check_split_sizes(cfg.data.root, {s: dataset.split_size(s) for s in dataset.splits}, expected)
    return dataset


def check_split_sizes(root, sizes: dict[str, int], expected: dict[str, int] | None) -> None:
    """`data.expected_sizes` for readers without official sizes (folder, demo)."""
    for split, n in (expected or {}).items():
        if sizes.get(split) != n:
            raise DatasetError(
                f"{root}: split {split!r} has {sizes.get(split, 0):,} images, expected {n:,} "
                "(data.expected_sizes); fix data.root or data.expected_sizes"
            )


def load_corpus(cfg: ExperimentConfig) -> list[Report]:
    r = cfg.reports
    return load_reports(
        r.path,
        fmt=r.format,
        organ=r.organ,
        projects=r.projects,
        text_field=r.text_field,
        id_field=r.id_field,
        project_map=r.project_map,
        encoding=r.encoding,
        whitespace=r.whitespace,
    )


def pairing_inputs(cfg: ExperimentConfig, dataset: ImageDataset, reports: list[Report]) -> list[Report]:
    """The texts pairing searches (pairing.texts), checked as pairing will use them (top_k of them)."""
    from clipit.pairing.texts import pairing_texts

    texts = pairing_texts(cfg, dataset, reports)
    if cfg.pairing.top_k > len(texts):
        raise ConfigError(
            f"pairing.top_k={cfg.pairing.top_k} but the corpus has only {len(texts)} texts; lower pairing.top_k"
        )
    return texts


def run_pairing(
    cfg: ExperimentConfig, dataset: ImageDataset, reports: list[Report], overwrite: bool = False
) -> dict[str, Path]:
    """Pairs per split; skipped when the files on disk were made for this config, one line when they were
    made under another one, recomputed then with `overwrite` (clipit/pairing/engine.py)."""
    from clipit.pairing.encoders import build_pairing_model
    from clipit.pairing.engine import current_pairs, pair_dataset, pairing_identity, pairing_spec
    from clipit.weights import resolve_pairing_checkpoint

    p = cfg.pairing
    texts = pairing_inputs(cfg, dataset, reports)  # the report corpus, or class prompts (pairing.texts)
    done = current_pairs(cfg, dataset, texts, overwrite)
    if done is not None:
        return done

    def build_model():
        prepare_demo_clip(cfg)
        checkpoint = resolve_pairing_checkpoint(p.model, p.checkpoint, cfg.model.weights_file)
        return build_pairing_model(p.model, checkpoint, p.device, p.precision)

    if p.from_reference:  # the authors' pair indices instead of a search (config_checks.check_reference_pairing)
        from clipit.pairing.engine import import_reference_pairs

        return import_reference_pairs(
            build_model,
            dataset,
            texts,
            cfg.reports.path,
            p.from_reference,
            p.dir,
            p.batch_size,
            pairing_spec(cfg),
            pairing_identity(cfg, dataset, texts),
        )
    return pair_dataset(
        build_model(),
        dataset,
        texts,
        Path(p.dir),
        top_k=p.top_k,
        batch_size=p.batch_size,
        num_workers=p.num_workers,
        search=p.search,
        spec=pairing_spec(cfg),
        identity=pairing_identity(cfg, dataset, texts),
    )


def class_agreement(dataset: ImageDataset, reports: list[Report], pair_paths: dict[str, Path]) -> dict | None:
    """How often the paired report's class matches the image's class (only for corpora that know it)."""
    from clipit.pairing.engine import load_pairs

    report_class = [r.meta.get("demo_class") for r in reports]
    if any(c is None for c in report_class):
        return None
    index = {c: i for i, c in enumerate(dataset.classes)}
    report_labels = np.array([index.get(c, -1) for c in report_class])
    result, all_hits, all_n = {}, 0, 0
    for split, path in pair_paths.items():
        pairs = load_pairs(path)
        hits = report_labels[pairs["indices"][:, 0]] == pairs["labels"]
        result[split] = float(hits.mean())
        all_hits, all_n = all_hits + int(hits.sum()), all_n + len(hits)
    labels = np.concatenate([load_pairs(p)["labels"] for p in pair_paths.values()])
    image_prior = np.bincount(labels, minlength=len(dataset.classes)) / len(labels)
    report_prior = np.bincount(report_labels[report_labels >= 0], minlength=len(dataset.classes)) / len(report_labels)
    result["all"] = all_hits / all_n
    result["chance"] = float(image_prior @ report_prior)  # agreement of a random report
    return result


def run_shards(
    cfg: ExperimentConfig,
    dataset: ImageDataset,
    reports: list[Report],
    pair_paths: dict[str, Path],
    part: int | None = None,
    num_parts: int | None = None,
    finalize: bool = False,
    overwrite: bool = False,
) -> Path | None:
    """All shards and the manifest, or one part of a compute-node build (clipit/shards/stage.py); returns the
    manifest once the set is complete, None while other parts' shards are still missing."""
    from clipit.pairing.texts import pairing_texts
    from clipit.shards.stage import run_shard_stage

    return run_shard_stage(
        cfg,
        dataset,
        pairing_texts(cfg, dataset, reports),
        pair_paths,
        part=part,
        num_parts=num_parts,
        finalize=finalize,
        echo=print,
        overwrite=overwrite,
    )


def pair_stage(cfg: ExperimentConfig, log=print, overwrite: bool = False) -> dict[str, Path]:
    """`clipit pair`: pairs of every split (skipped when current), and the class agreement where known."""
    from clipit.pairing.texts import pairing_texts

    prepare_demo_data(cfg, log, overwrite)
    dataset, reports = build_image_dataset(cfg), load_corpus(cfg)
    paths = run_pairing(cfg, dataset, reports, overwrite)
    agreement = class_agreement(dataset, pairing_texts(cfg, dataset, reports), paths)
    if agreement:
        log(f"class agreement {100 * agreement['all']:.1f}% (chance {100 * agreement['chance']:.1f}%)")
    return paths


def shard_stage(
    cfg: ExperimentConfig,
    part: int | None = None,
    num_parts: int | None = None,
    finalize: bool = False,
    overwrite: bool = False,
) -> Path | None:
    """`clipit shard build`: the whole set (pairing first if needed), or one part of it, or only the
    manifest; returns the manifest once the set is complete."""
    from clipit.shards.manifest import ShardError
    from clipit.shards.stage import require_pairs

    if (part is None) != (num_parts is None):
        raise ShardError("give --part I and --num-parts N together (0 <= I < N)")
    if part is None:  # array parts find the inputs prepared by `clipit prepare demo` or `clipit pair`
        prepare_demo_data(cfg, overwrite=overwrite)
    dataset, reports = build_image_dataset(cfg), load_corpus(cfg)
    if part is None and not finalize:
        pairs = run_pairing(cfg, dataset, reports, overwrite)
    else:  # parts never pair (N jobs would each pair everything): `clipit pair` runs once before them
        pairs = require_pairs(cfg, dataset, reports)
    return run_shards(
        cfg, dataset, reports, pairs, part=part, num_parts=num_parts, finalize=finalize, overwrite=overwrite
    )


def check_method(cfg: ExperimentConfig, method: str) -> None:
    if method not in cfg.methods:
        raise ConfigError(f"--method {method!r} is not in the config's methods; choose one of {sorted(cfg.methods)}")


def warm_start_of(cfg: ExperimentConfig, method: str, seed: int) -> Path | None:
    """The best checkpoint a method starts from (its warm-start method's run of the same seed)."""
    tcfg = cfg.methods[method]
    if not tcfg.warm_start:
        return None
    warm = layout.warm_start(layout.run_dir(cfg.output_dir, method, seed), tcfg.warm_start)
    if not warm.with_suffix(".json").exists():
        raise ConfigError(f"{warm}.json: warm start for {method} seed {seed} is missing; train {tcfg.warm_start} first")
    return warm


def trained_run_dir(cfg: ExperimentConfig, method: str, seed: int) -> Path:
    """The run directory of a trained cell; one line naming the train command when it is not trained."""
    check_method(cfg, method)
    run_dir = layout.run_dir(cfg.output_dir, method, seed)
    if not layout.is_trained(run_dir):
        raise ConfigError(
            f"{layout.train_summary(run_dir)}: {method} seed {seed} is not trained; run "
            f"`clipit train --config <config> --method {method} --seed {seed}` first"
        )
    return run_dir


def evaluate_cell(cfg: ExperimentConfig, method: str, seed: int, split: str = "test", overwrite: bool = False) -> dict:
    """`clipit evaluate`: metrics of a trained cell on one split (skipped when written already)."""
    from clipit.evaluation.evaluate import evaluate_run

    run_dir = trained_run_dir(cfg, method, seed)
    warm_start = warm_start_of(cfg, method, seed)
    return evaluate_run(cfg, method, run_dir, split=split, warm_start=warm_start, overwrite=overwrite)


def frozen_eval_cell(cfg: ExperimentConfig, method: str, seed: int) -> dict:
    """`clipit evaluate --frozen`: k-NN and SimpleShot on a trained cell's backbone."""
    from clipit.evaluation.frozen import frozen_eval_run

    run_dir = trained_run_dir(cfg, method, seed)
    return frozen_eval_run(cfg, method, run_dir, warm_start=warm_start_of(cfg, method, seed))


def train_and_evaluate(cfg: ExperimentConfig, method: str, seed: int, overwrite: bool = False) -> dict:
    """One cell in this process: what `clipit train --method M --seed S` runs."""
    from clipit.training.trainer import fit

    check_method(cfg, method)
    run_dir = layout.run_dir(cfg.output_dir, method, seed)
    fit(cfg, method, seed, run_dir, warm_start=warm_start_of(cfg, method, seed))
    return evaluate_cell(cfg, method, seed, overwrite=overwrite)


def training_cells(cfg: ExperimentConfig, source: ConfigSource, command: str = "train", *extra: str) -> list[ChainCell]:
    """Every (method, seed) of the config as a cell, warm starts first, each naming the cells it needs."""
    cells = []
    for method in method_order(cfg):
        tcfg = cfg.methods[method]
        for seed in cfg.seeds:
            needs = tuple(f"{w} seed {seed}" for w in dict.fromkeys((tcfg.warm_start, tcfg.text_warm_start)) if w)
            argv = tuple(cell_argv(command, source, method, seed, *extra))
            cells.append(ChainCell(f"{method} seed {seed}", argv, needs))
    return cells


def seed_cells(source: ConfigSource, command: str, method: str, seeds: list[int], *extra: str) -> list[ChainCell]:
    """One method over several seeds (`clipit train|evaluate` without --seed): one cell per seed."""
    return [ChainCell(f"{method} seed {s}", tuple(cell_argv(command, source, method, s, *extra))) for s in seeds]


def run_cells(cells: list[ChainCell], log=print) -> None:
    """The cells in order, each in its own process; one line naming the failed cells if any failed
    (the independent ones still ran; those warm-starting from a failed one were skipped)."""
    error = chain_error(run_chain(cells, log=log))
    if error is not None:
        raise error


def run_all(cfg: ExperimentConfig, source: ConfigSource, log=print, overwrite: bool = False) -> dict:
    """The whole slice (`source` is where `cfg` came from: what each cell's process loads); returns
    {"agreement": ..., "results": {method: [metrics per seed]}, "table": str}. Every stage reuses what it
    made under this config; output made under another one stops it with one line, unless `overwrite`."""
    from clipit.evaluation.evaluate import format_table, summarize

    prepare_demo_data(cfg, log, overwrite)
    dataset = build_image_dataset(cfg)
    reports = load_corpus(cfg)
    log(
        f"[1/4] corpus: {len(reports)} reports; images: "
        + ", ".join(f"{s} {dataset.split_size(s)}" for s in dataset.splits)
    )
    pair_paths = run_pairing(cfg, dataset, reports, overwrite)
    from clipit.pairing.texts import pairing_texts

    agreement = class_agreement(dataset, pairing_texts(cfg, dataset, reports), pair_paths)
    if agreement:
        log(
            f"[2/4] pairing class agreement: {100 * agreement['all']:.1f}% "
            f"(chance {100 * agreement['chance']:.1f}%; "
            + ", ".join(f"{s} {100 * agreement[s]:.1f}%" for s in dataset.splits)
            + ")"
        )
    manifest = run_shards(cfg, dataset, reports, pair_paths, overwrite=overwrite)
    log(f"[3/4] shards: {manifest.parent}")
    cells = cells_to_run(cfg, training_cells(cfg, source, "train", *([OVERWRITE] if overwrite else [])), overwrite)
    if len(cells) < len(cfg.methods) * len(cfg.seeds):
        log(f"[clipit] {len(cfg.methods) * len(cfg.seeds) - len(cells)} cells finished under this config: reused")
    run_cells(cells, log=log)
    results: dict[str, list[dict]] = {}
    for method in method_order(cfg):
        for seed in cfg.seeds:
            run = layout.run_dir(cfg.output_dir, method, seed)
            results.setdefault(method, []).append(read_json(layout.metrics_file(run)))
    table = format_table(summarize(results), results)
    log("[4/4] test results (mean ± std over seeds, %):\n" + table)
    summary = {"agreement": agreement, "results": results, "table": table}
    atomic_write_json(Path(cfg.output_dir) / "results.json", summary)
    atomic_write_text(Path(cfg.output_dir) / "results.md", table + "\n")
    return summary
