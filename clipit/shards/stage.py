"""The shard stage of a config: check that pairing is done and current, plan the shard set, write
(a part of) it, and write the manifest and texts.jsonl once every shard exists. The format itself
(one shard, the plan, the manifest, reading and validation) lives in clipit/shards/format.py.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from clipit.data.base import ImageDataset
from clipit.io import atomic_write_json, read_json
from clipit.shards.format import (MANIFEST, PLAN, TEXTS, ShardError, build_plan, check_plan, missing_shards, part_units,
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
    out = Path(cfg.shards.dir)
    cache = _text_cache(cfg, texts)
    pairs = _load_pairs(cfg, dataset, pair_paths, cache)
    plan = _plan(cfg, dataset, cache)
    if _is_complete(out, plan, texts):
        return out / MANIFEST
    if finalize:
        missing = missing_shards(dataset, out, cfg.shards.samples_per_shard)
        if missing:
            raise ShardError(f"{missing[0]}: {len(missing)} shard(s) missing; rerun the parts that wrote them "
                             "(or `clipit shard build` without --part) before --finalize")
        return _write_manifest(cfg, dataset, texts, cache, plan)
    done = _write_part(cfg, dataset, pairs, cache, part, num_parts)
    missing = missing_shards(dataset, out, cfg.shards.samples_per_shard)
    if missing:
        echo(f"part {part}/{num_parts}: {done} shard(s) done; {len(missing)} of other parts still missing "
             "(the last part to finish, or `clipit shard build --finalize`, writes the manifest)")
        return None
    return _write_manifest(cfg, dataset, texts, cache, plan)


@dataclass(frozen=True)
class _TextCache:
    """The pairing stage's text embeddings, checked against this config's corpus and model.text_dim."""

    dir: Path
    embeddings: np.ndarray
    ids: list[str]
    identity: dict  # identity.json: which model made the embeddings
    fingerprint: str  # of the config's text corpus
    dim: int


def _text_cache(cfg, texts: list) -> _TextCache:
    from clipit.corpus import corpus_fingerprint
    from clipit.pairing.embedding_cache import load_text_embeddings

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
    return _TextCache(cache_dir, embeddings, text_ids, identity, fingerprint, dim)


def _load_pairs(cfg, dataset: ImageDataset, pair_paths: dict[str, Path], cache: _TextCache) -> dict[str, dict]:
    """The pairs of every split, checked against the text cache, the split sizes and the text selection."""
    from clipit.pairing.engine import load_pairs, read_pairs_meta

    s = cfg.shards
    pairs = {}
    for split in dataset.splits:
        path = pair_paths.get(split)
        if path is None or not Path(path).exists():
            raise ShardError(f"{path or Path(cfg.pairing.dir) / f'pairs-{split}.npz'}: pairs missing; run "
                             "`clipit pair --config <config>` first")
        pairs[split] = load_pairs(path)
        meta = read_pairs_meta(path)
        if meta is not None and meta.get("fingerprint") != cache.fingerprint:
            raise ShardError(f"{path}: pairs were made for another text corpus than {cache.dir}; rerun `clipit pair`")
        idx = pairs[split]["indices"]
        if idx.size and (idx.min() < 0 or idx.max() >= len(cache.ids)):
            raise ShardError(f"{path}: pairs point at text {int(idx.max())} but {cache.dir} holds {len(cache.ids)}; "
                             f"delete {cfg.pairing.dir} and rerun `clipit pair`")
        if idx.shape[0] != dataset.split_size(split):
            raise ShardError(f"{path}: pairs cover {idx.shape[0]} images but split {split} has "
                             f"{dataset.split_size(split)}; delete it and rerun `clipit pair`")
        select_texts(pairs[split], split, s.use_rank, s.random_report_seed, len(cache.ids), where=str(path))
    return pairs


def _plan(cfg, dataset: ImageDataset, cache: _TextCache) -> dict:
    s = cfg.shards
    selection = ({"mode": "random", "seed": int(s.random_report_seed)} if s.random_report_seed is not None
                 else {"mode": "rank", "rank": int(s.use_rank)})
    return build_plan(dataset, s.samples_per_shard, cache.dim, cache.identity,
                      {"kind": cfg.pairing.texts, "count": len(cache.ids), "fingerprint": cache.fingerprint}, selection)


def _is_complete(out: Path, plan: dict, texts: list) -> bool:
    """True when the set is built for this plan already; else the plan is recorded (by the first part to start)
    so that parts of another plan fail instead of mixing in."""
    if check_plan(out, plan):
        if not (out / TEXTS).exists():  # shard sets built before texts were stored next to them
            write_texts(out, texts)
        return True
    if not (out / PLAN).exists():
        atomic_write_json(out / PLAN, plan)
    return False


def _write_part(cfg, dataset: ImageDataset, pairs: dict[str, dict], cache: _TextCache, part: int | None,
                num_parts: int | None) -> int:
    """Write this part's shards (all of them without `part`); returns how many shards the part has."""
    s = cfg.shards
    units = shard_units(dataset, s.samples_per_shard)
    if part is not None:
        units = part_units(units, part, num_parts or 1)
    by_split: dict[str, list[int]] = {}
    for split, index in units:
        by_split.setdefault(split, []).append(index)
    for split, indices in by_split.items():
        write_split_shards(dataset, split, pairs[split], cache.embeddings, cache.ids, Path(s.dir), s.samples_per_shard,
                           only=indices, use_rank=s.use_rank, random_seed=s.random_report_seed)
    return len(units)


def _write_manifest(cfg, dataset: ImageDataset, texts: list, cache: _TextCache, plan: dict) -> Path:
    """texts.jsonl, then the manifest (written last: its presence marks the set complete)."""
    out = Path(cfg.shards.dir)
    extra = {k: plan[k] for k in ("texts", "selection")}
    extra.update({"reports": cfg.reports.path, "pairing_model": cfg.pairing.model})
    write_texts(out, texts)
    return write_manifest(dataset, out, cfg.shards.samples_per_shard, cache.dim, cache.identity, extra=extra)
