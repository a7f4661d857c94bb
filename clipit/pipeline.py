"""The stages in order, each skipping work whose output already exists:
reports -> pairing -> shards -> training (per method and seed) -> evaluation -> summary table.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from clipit.config import ConfigError, ExperimentConfig
from clipit.data.base import ImageDataset
from clipit.io import atomic_write_json, atomic_write_text, read_json
from clipit.reports import Report, load_reports


def build_image_dataset(cfg: ExperimentConfig) -> ImageDataset:
    if cfg.data.name == "demo":
        from clipit.data import demo
        from clipit.data.folder import ImageFolderDataset

        d = cfg.data.demo
        demo.write_demo_images(Path(cfg.data.root), d.counts, d.image_size, d.seed)
        dataset = ImageFolderDataset(cfg.data.root, splits=tuple(d.counts), classes=demo.DEMO_CLASSES)
        dataset.name = "demo"
        return dataset
    from clipit.data.registry import build_dataset

    return build_dataset(cfg.data.name, cfg.data.root)


def prepare_demo_inputs(cfg: ExperimentConfig) -> None:
    """The demo's report corpus and its stand-in for CONCH (a small CLIP trained on a separate paired set)."""
    from clipit.data import demo
    from clipit.pairing import demo_clip

    d = cfg.data.demo
    if not Path(cfg.reports.path).exists():
        demo.write_reports_jsonl(Path(cfg.reports.path), demo.make_reports(d.n_reports, seed=d.seed + 1))
    if cfg.pairing.model == "demo-clip":
        if not cfg.pairing.checkpoint:
            raise ConfigError("pairing.checkpoint must name where the demo CLIP is saved")
        if not Path(cfg.pairing.checkpoint).exists():
            images, _, captions = demo.make_paired_set(d.n_paired, d.image_size, seed=d.seed + 2)
            demo_clip.train_demo_clip(images, captions, Path(cfg.pairing.checkpoint).parent, seconds=d.clip_seconds,
                                      seed=d.seed)


def load_corpus(cfg: ExperimentConfig) -> list[Report]:
    r = cfg.reports
    return load_reports(r.path, fmt=r.format, organ=r.organ, projects=r.projects)


def run_pairing(cfg: ExperimentConfig, dataset: ImageDataset, reports: list[Report]) -> dict[str, Path]:
    from clipit.pairing.engine import pair_dataset
    from clipit.pairing.models import build_pairing_model

    out = Path(cfg.pairing.dir)
    done = {s: out / f"pairs-{s}.npz" for s in dataset.splits}
    if all(p.exists() for p in done.values()) and (out / "text-embeddings").exists():
        return done
    model = build_pairing_model(cfg.pairing.model, cfg.pairing.checkpoint, cfg.pairing.device)
    return pair_dataset(model, dataset, reports, out, top_k=cfg.pairing.top_k, batch_size=cfg.pairing.batch_size)


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


def run_shards(cfg: ExperimentConfig, dataset: ImageDataset, reports: list[Report], pair_paths: dict[str, Path]) -> Path:
    from clipit.pairing.engine import load_pairs
    from clipit.reports import load_text_embeddings
    from clipit.shards import MANIFEST, write_manifest, write_split_shards

    out = Path(cfg.shards.dir)
    if (out / MANIFEST).exists():
        return out / MANIFEST
    cached = load_text_embeddings(Path(cfg.pairing.dir) / "text-embeddings")
    if cached is None:
        raise ConfigError(f"{cfg.pairing.dir}/text-embeddings: no report embeddings; run the pairing stage first")
    embeddings, report_ids = cached
    if len(report_ids) != len(reports):
        raise ConfigError(f"{cfg.pairing.dir}: embeddings cover {len(report_ids)} reports, corpus has {len(reports)}; "
                          "delete the pairing dir and re-run pairing")
    identity = read_json(Path(cfg.pairing.dir) / "text-embeddings" / "identity.json")
    for split in dataset.splits:
        write_split_shards(dataset, split, load_pairs(pair_paths[split]), embeddings, report_ids, out,
                           cfg.shards.samples_per_shard)
    return write_manifest(dataset, out, cfg.shards.samples_per_shard, embeddings.shape[1], identity,
                          extra={"reports": cfg.reports.path, "pairing_model": cfg.pairing.model})


def method_order(cfg: ExperimentConfig) -> list[str]:
    """Methods sorted so that each warm start is trained before the method that needs it."""
    order: list[str] = []

    def visit(name: str, trail: tuple = ()):
        if name in order:
            return
        if name not in cfg.methods:
            raise ConfigError(f"warm_start names unknown method {name!r}; known: {sorted(cfg.methods)}")
        if name in trail:
            raise ConfigError(f"warm_start cycle: {' -> '.join(trail + (name,))}")
        if cfg.methods[name].warm_start:
            visit(cfg.methods[name].warm_start, trail + (name,))
        order.append(name)

    for name in cfg.methods:
        visit(name)
    return order


def run_dir_for(cfg: ExperimentConfig, method: str, seed: int) -> Path:
    return Path(cfg.output_dir) / "runs" / method / f"seed-{seed}"


def train_and_evaluate(cfg: ExperimentConfig, method: str, seed: int) -> dict:
    from clipit.evaluate import evaluate_run
    from clipit.training.trainer import fit

    tcfg = cfg.methods[method]
    warm = run_dir_for(cfg, tcfg.warm_start, seed) / "best" if tcfg.warm_start else None
    if warm is not None and not warm.with_suffix(".json").exists():
        raise ConfigError(f"{warm}.json: warm start for {method} seed {seed} is missing; train {tcfg.warm_start} first")
    run_dir = run_dir_for(cfg, method, seed)
    fit(cfg, method, seed, run_dir, warm_start=warm)
    return evaluate_run(cfg, method, run_dir)


def run_all(cfg: ExperimentConfig, log=print) -> dict:
    """The whole slice; returns {"agreement": ..., "results": {method: [metrics per seed]}, "table": str}."""
    from clipit.evaluate import format_table, summarize

    if cfg.data.name == "demo":
        prepare_demo_inputs(cfg)
    dataset = build_image_dataset(cfg)
    reports = load_corpus(cfg)
    log(f"[1/4] corpus: {len(reports)} reports; images: " +
        ", ".join(f"{s} {dataset.split_size(s)}" for s in dataset.splits))
    pair_paths = run_pairing(cfg, dataset, reports)
    agreement = class_agreement(dataset, reports, pair_paths)
    if agreement:
        log(f"[2/4] pairing class agreement: {100 * agreement['all']:.1f}% "
            f"(chance {100 * agreement['chance']:.1f}%; " +
            ", ".join(f"{s} {100 * agreement[s]:.1f}%" for s in dataset.splits) + ")")
    manifest = run_shards(cfg, dataset, reports, pair_paths)
    log(f"[3/4] shards: {manifest.parent}")
    results: dict[str, list[dict]] = {}
    for method in method_order(cfg):
        for seed in cfg.seeds:
            results.setdefault(method, []).append(train_and_evaluate(cfg, method, seed))
    table = format_table(summarize(results), results)
    log("[4/4] test results (mean ± std over seeds, %):\n" + table)
    summary = {"agreement": agreement, "results": results, "table": table}
    atomic_write_json(Path(cfg.output_dir) / "results.json", summary)
    atomic_write_text(Path(cfg.output_dir) / "results.md", table + "\n")
    return summary
