"""The shard stage of a config: check that pairing is done and current, plan the shard set, write
(a part of) it, and write the manifest and texts.jsonl once every shard exists. The format itself
(one shard, the plan, the manifest, reading and validation) lives in clipit/shards.py.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from clipit.data.base import ImageDataset
from clipit.io import atomic_write_json, read_json
from clipit.shards import (MANIFEST, PLAN, TEXTS, ShardError, build_plan, check_plan, missing_shards, part_units,
                           select_texts, shard_units, write_manifest, write_split_shards, write_texts)

log = logging.getLogger(__name__)


def require_pairs(cfg, dataset: ImageDataset, reports: list) -> dict[str, Path]:
    """The pairs of every split, made for this config; an error (not a pairing run) when they are not."""
    from clipit.pairing.engine import current_pairs
    from clipit.pairing.texts import pairing_texts

    pairs = current_pairs(cfg, dataset, pairing_texts(cfg, dataset, reports))
    if pairs is None:
        raise ShardError(f"{cfg.pairing.dir}: pairs for this config are missing or were made with other settings; "
                         "run `clipit pair --config <config>` once before the shard parts")
    return pairs


def run_shard_stage(cfg, dataset: ImageDataset, texts: list, pair_paths: dict[str, Path], part: int | None = None,
                    num_parts: int | None = None, finalize: bool = False,
                    echo: Callable[[str], None] = log.info) -> Path | None:
    """Build (a part of) the shard set for a config; returns the manifest once the set is complete.

    Without `part`, all shards are written, then the manifest. With `part`/`num_parts`, only that part's
    shards; the manifest follows if no shard of any part is missing. `finalize` only writes the manifest
    (every shard must exist)."""
    from clipit.pairing.engine import load_pairs, read_pairs_meta
    from clipit.reports import corpus_fingerprint, load_text_embeddings

    out = Path(cfg.shards.dir)
    cache_dir = Path(cfg.pairing.dir) / "text-embeddings"
    cached = load_text_embeddings(cache_dir)
    if cached is None:
        raise ShardError(f"{cache_dir}: no text embeddings; run `clipit pair --config <config>` first")
    embeddings, text_ids = cached
    identity = read_json(cache_dir / "identity.json")
    fingerprint = corpus_fingerprint(texts)
    if identity.get("fingerprint") != fingerprint:
        raise ShardError(f"{cache_dir}: embeddings were made for another text corpus ({len(text_ids)} texts; the "
                         f"config gives {len(texts)}); rerun `clipit pair` to recompute them")
    dim = int(embeddings.shape[1])
    if dim != cfg.model.text_dim:
        raise ShardError(f"{cache_dir / 'embeddings.npy'}: text embeddings are {dim}-d but model.text_dim is "
                         f"{cfg.model.text_dim}; set model.text_dim: {dim} in the config (or pair with a "
                         f"{cfg.model.text_dim}-d model)")
    s = cfg.shards
    selection = ({"mode": "random", "seed": int(s.random_report_seed)} if s.random_report_seed is not None
                 else {"mode": "rank", "rank": int(s.use_rank)})
    pairs = {}
    for split in dataset.splits:
        path = pair_paths.get(split)
        if path is None or not Path(path).exists():
            raise ShardError(f"{path or Path(cfg.pairing.dir) / f'pairs-{split}.npz'}: pairs missing; run "
                             "`clipit pair --config <config>` first")
        pairs[split] = load_pairs(path)
        meta = read_pairs_meta(path)
        if meta is not None and meta.get("fingerprint") != fingerprint:
            raise ShardError(f"{path}: pairs were made for another text corpus than {cache_dir}; rerun `clipit pair`")
        idx = pairs[split]["indices"]
        if idx.size and (idx.min() < 0 or idx.max() >= len(text_ids)):
            raise ShardError(f"{path}: pairs point at text {int(idx.max())} but {cache_dir} holds {len(text_ids)}; "
                             f"delete {cfg.pairing.dir} and rerun `clipit pair`")
        if idx.shape[0] != dataset.split_size(split):
            raise ShardError(f"{path}: pairs cover {idx.shape[0]} images but split {split} has "
                             f"{dataset.split_size(split)}; delete it and rerun `clipit pair`")
        select_texts(pairs[split], split, s.use_rank, s.random_report_seed, len(text_ids), where=str(path))
    plan = build_plan(dataset, s.samples_per_shard, dim, identity,
                      {"kind": cfg.pairing.texts, "count": len(text_ids), "fingerprint": fingerprint}, selection)
    extra = {k: plan[k] for k in ("texts", "selection")}
    extra.update({"reports": cfg.reports.path, "pairing_model": cfg.pairing.model})
    if check_plan(out, plan):
        if not (out / TEXTS).exists():  # shard sets built before texts were stored next to them
            write_texts(out, texts)
        return out / MANIFEST
    if not (out / PLAN).exists():
        atomic_write_json(out / PLAN, plan)

    def manifest() -> Path:
        write_texts(out, texts)
        return write_manifest(dataset, out, s.samples_per_shard, dim, identity, extra=extra)

    if finalize:
        missing = missing_shards(dataset, out, s.samples_per_shard)
        if missing:
            raise ShardError(f"{missing[0]}: {len(missing)} shard(s) missing; rerun the parts that wrote them "
                             "(or `clipit shard` without --part) before --finalize")
        return manifest()
    units = shard_units(dataset, s.samples_per_shard)
    if part is not None:
        units = part_units(units, part, num_parts or 1)
    by_split: dict[str, list[int]] = {}
    for split, index in units:
        by_split.setdefault(split, []).append(index)
    for split, indices in by_split.items():
        write_split_shards(dataset, split, pairs[split], embeddings, text_ids, out, s.samples_per_shard, only=indices,
                           use_rank=s.use_rank, random_seed=s.random_report_seed)
    missing = missing_shards(dataset, out, s.samples_per_shard)
    if missing:
        echo(f"part {part}/{num_parts}: {len(units)} shard(s) done; {len(missing)} of other parts still missing "
             "(the last part to finish, or `clipit shard --finalize`, writes the manifest)")
        return None
    return manifest()
