"""The shard stage of a config: check that pairing is done and current, plan the shard set, write
(a part of) it, and write the manifest and texts.jsonl once every shard exists. The format itself
(names and plan: manifest.py, image codecs: codec.py, writing: writer.py, reading: reader.py, checking:
validate.py) lives next to it in clipit/shards/.

Reruns rebuild exactly what is missing: a deleted shard is written again (byte-identical) and the
manifest after it. The manifest step lists a shard it did not write itself only after reading it back
(writer.write_manifest), so a manifest deleted and rebuilt never blesses a corrupt shard.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clipit.data.base import ImageDataset, ImageDecodeError
from clipit.errors import one_line
from clipit.identity import OVERWRITE, OutputChanged
from clipit.io import atomic_write_json, read_json
from clipit.layout import FEATURES
from clipit.locks import LockError, exclusive
from clipit.shards.codec import resolve_image
from clipit.shards.manifest import (
    MANIFEST,
    PLAN,
    TEXTS,
    VERIFIED,
    ShardError,
    build_plan,
    check_plan,
    existing_codec,
    write_texts,
)
from clipit.shards.order import plan_order, split_order
from clipit.shards.writer import (
    SplitTexts,
    missing_shards,
    part_units,
    remove_stale_temps,
    select_texts,
    shard_units,
    write_manifest,
    write_split_shards,
)

log = logging.getLogger(__name__)


def require_pairs(cfg, dataset: ImageDataset, reports: list) -> dict[str, Path]:
    """The pairs of every split, made for this config; an error (not a pairing run) when they are not."""
    from clipit.pairing.engine import current_pairs
    from clipit.pairing.texts import pairing_texts

    pairs = current_pairs(cfg, dataset, pairing_texts(cfg, dataset, reports))
    if pairs is None:
        raise ShardError(
            f"{cfg.pairing.dir}: pairs for this config are missing or were made with other settings; "
            "run `clipit pair --config <config>` once before the shard parts"
        )
    return pairs


def run_shard_stage(
    cfg,
    dataset: ImageDataset,
    texts: list,
    pair_paths: dict[str, Path],
    part: int | None = None,
    num_parts: int | None = None,
    finalize: bool = False,
    echo: Callable[[str], None] = log.info,
    overwrite: bool = False,
) -> Path | None:
    """Build (a part of) the shard set for a config; returns the manifest once the set is complete.
    A set of another plan stops with one line naming the changed keys (manifest.check_plan); a whole
    build with `overwrite` deletes it first.

    Without `part`, all missing shards are written, then the manifest. With `part`/`num_parts`, only that
    part's missing shards; the manifest follows if no shard of any part is missing. `finalize` only writes
    the manifest (every shard must exist). A set whose manifest lists a shard that is gone is not complete:
    the rerun that owns the shard rebuilds it (byte-identical) and writes the manifest again.

    One writer per directory: a whole build holds the directory's lock (clipit.locks) from start to end,
    so a second one is refused with one line. Parts of an array build disjoint shards of one directory
    at the same time: they take the directory only to write build.json and the manifest (waiting for each
    other there), and each shard is written under its own lock (shards/writer.py)."""
    out = Path(cfg.shards.dir)
    cache = _text_cache(cfg, texts)
    pairs = _load_pairs(cfg, dataset, pair_paths, cache)
    plan = _plan(cfg, dataset, cache, texts)
    per_shard = cfg.shards.samples_per_shard
    if overwrite:
        _replace_changed_set(out, plan, part is not None or finalize, echo)
    state = _state(out, plan, dataset, per_shard)
    if state == "complete":
        return out / MANIFEST
    manifest_step = functools.partial(_write_manifest, cfg, dataset, texts, cache, plan, pairs)
    if part is None and not finalize:
        with exclusive(out, LOCK_WHAT):
            if _settle(out, plan, texts, dataset, per_shard):
                return out / MANIFEST
            return manifest_step(_write_part(cfg, dataset, pairs, cache, plan, None, None))
    if state != "planned":  # build.json (or texts.jsonl next to a complete set) still to write
        with _directory_turn(out, echo):
            if _settle(out, plan, texts, dataset, per_shard):
                return out / MANIFEST
    written: list[Path] = []
    if not finalize:
        written = _write_part(cfg, dataset, pairs, cache, plan, part, num_parts)
        missing = missing_shards(dataset, out, per_shard)
        if missing:
            echo(
                f"part {part}/{num_parts}: {len(written)} shard(s) written; {len(missing)} of other parts still "
                "missing (the last part to finish, or `clipit shard build --finalize`, writes the manifest)"
            )
            return None
    with _directory_turn(out, echo):
        if _settle(out, plan, texts, dataset, per_shard):  # another part wrote the manifest meanwhile
            return out / MANIFEST
        missing = missing_shards(dataset, out, per_shard)
        if missing:
            raise ShardError(
                f"{missing[0]}: {len(missing)} shard(s) missing; rerun the parts that wrote them "
                "(or `clipit shard build` without --part) before --finalize"
            )
        return manifest_step(written)


LOCK_WHAT = "shard directory"


def _replace_changed_set(out: Path, plan: dict, partial: bool, echo: Callable[[str], None]) -> None:
    """`--overwrite`: delete a set built under another plan (its shards, JSON files and feature caches),
    holding the directory; a set of this plan is kept (and completed as usual)."""
    if partial:
        raise ShardError(f"{OVERWRITE} replaces a whole shard set: give it without --part and --finalize")
    with exclusive(out, LOCK_WHAT):
        try:
            check_plan(out, plan)
            return
        except OutputChanged as err:
            echo(f"{OVERWRITE}: deleting {out} ({one_line(err)})")
        splits = set(plan["counts"])
        for name in (MANIFEST, PLAN):
            with contextlib.suppress(OSError, ValueError, AttributeError):
                splits |= set(read_json(out / name).get("counts") or {})
        for split in sorted(splits):
            folder = out / split
            for tar in folder.glob(f"{split}-*.tar") if folder.is_dir() else ():
                tar.unlink()
        for name in (MANIFEST, PLAN, TEXTS, VERIFIED):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / FEATURES, ignore_errors=True)  # made from the deleted shards


PART_WAIT_S = 1800.0  # a part waits this long for the directory (another part checking shards for the manifest)


@contextlib.contextmanager
def _directory_turn(out: Path, echo: Callable[[str], None], wait_s: float = PART_WAIT_S):
    """The directory lock for a part or --finalize: taken at once if free, else waited for (with a line)."""
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(exclusive(out, LOCK_WHAT))
        except LockError as err:
            echo(f"waiting up to {wait_s:.0f} s for the lock: {one_line(err)}")
            stack.enter_context(exclusive(out, LOCK_WHAT, wait_s=wait_s))
        yield


def _state(out: Path, plan: dict, dataset: ImageDataset, per_shard: int) -> str:
    """Where the set stands (read only, no lock needed: every file is written atomically): "complete" (a
    manifest of this plan, every shard it lists and texts.jsonl exist), "texts" (complete but for
    texts.jsonl), "planned" (build.json of this plan, no complete manifest) or "new". Raises for another plan."""
    if check_plan(out, plan):
        if not missing_shards(dataset, out, per_shard):
            return "complete" if (out / TEXTS).exists() else "texts"
    return "planned" if (out / PLAN).exists() else "new"


def _settle(out: Path, plan: dict, texts: list, dataset: ImageDataset, per_shard: int) -> bool:
    """Under the directory lock: True when the set is complete (texts.jsonl written if it was missing);
    else the plan is recorded (by the first part to start) so that parts of another plan fail instead of
    mixing in. Temporary files of a killed writer of these files are removed (no live one: we hold the lock)."""
    for name in (PLAN, TEXTS, MANIFEST):
        remove_stale_temps(out / name)
    state = _state(out, plan, dataset, per_shard)
    if state == "texts":  # shard sets built before texts were stored next to them
        write_texts(out, texts)
    elif state == "new":
        atomic_write_json(out / PLAN, plan)
    return state in ("complete", "texts")


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
        raise ShardError(
            f"{cache_dir}: embeddings were made for another text corpus ({len(text_ids)} texts; the "
            f"config gives {len(texts)}); rerun `clipit pair` to recompute them"
        )
    dim = int(embeddings.shape[1])
    if dim != cfg.model.text_dim:
        raise ShardError(
            f"{cache_dir / 'embeddings.npy'}: text embeddings are {dim}-d but model.text_dim is "
            f"{cfg.model.text_dim}; set model.text_dim: {dim} in the config (or pair with a "
            f"{cfg.model.text_dim}-d model)"
        )
    return _TextCache(cache_dir, embeddings, text_ids, identity, fingerprint, dim)


def _load_pairs(cfg, dataset: ImageDataset, pair_paths: dict[str, Path], cache: _TextCache) -> dict[str, dict]:
    """The pairs of every split, checked against the text cache, the split sizes and the text selection."""
    from clipit.pairing.engine import load_pairs, read_pairs_meta

    s = cfg.shards
    pairs = {}
    for split in dataset.splits:
        path = pair_paths.get(split)
        if path is None or not Path(path).exists():
            raise ShardError(
                f"{path or Path(cfg.pairing.dir) / f'pairs-{split}.npz'}: pairs missing; run "
                "`clipit pair --config <config>` first"
            )
        pairs[split] = load_pairs(path)
        meta = read_pairs_meta(path)
        if meta is not None and meta.get("fingerprint") != cache.fingerprint:
            raise ShardError(f"{path}: pairs were made for another text corpus than {cache.dir}; rerun `clipit pair`")
        idx = pairs[split]["indices"]
        if idx.size and (idx.min() < 0 or idx.max() >= len(cache.ids)):
            raise ShardError(
                f"{path}: pairs point at text {int(idx.max())} but {cache.dir} holds {len(cache.ids)}; "
                f"delete {cfg.pairing.dir} and rerun `clipit pair`"
            )
        if idx.shape[0] != dataset.split_size(split):
            raise ShardError(
                f"{path}: pairs cover {idx.shape[0]} images but split {split} has "
                f"{dataset.split_size(split)}; delete it and rerun `clipit pair`"
            )
        select_texts(pairs[split], split, s.use_rank, s.random_report_seed, len(cache.ids), where=str(path))
    return pairs


def _plan(cfg, dataset: ImageDataset, cache: _TextCache, texts: list) -> dict:
    from clipit.pairing.engine import pairing_identity

    s = cfg.shards
    selection = (
        {"mode": "random", "seed": int(s.random_report_seed)}
        if s.random_report_seed is not None
        else {"mode": "rank", "rank": int(s.use_rank)}
    )
    try:
        image = resolve_image(s.codec, dataset, existing_codec(Path(s.dir)))
    except ImageDecodeError as err:
        raise ShardError(
            f"{dataset.name}: its first image does not decode ({err}); fix the dataset or set shards.codec: png"
        ) from None
    return build_plan(
        dataset,
        s.samples_per_shard,
        cache.dim,
        cache.identity,
        {"kind": cfg.pairing.texts, "count": len(cache.ids), "fingerprint": cache.fingerprint},
        selection,
        image,
        plan_order({split: dataset.split_size(split) for split in dataset.splits}),
        pairing_identity(cfg, dataset, texts),
    )


def _write_part(
    cfg,
    dataset: ImageDataset,
    pairs: dict[str, dict],
    cache: _TextCache,
    plan: dict,
    part: int | None,
    num_parts: int | None,
) -> list[Path]:
    """Write this part's missing shards (all missing ones without `part`); returns the shards it wrote."""
    s = cfg.shards
    units = shard_units(dataset, s.samples_per_shard)
    if part is not None:
        units = part_units(units, part, num_parts or 1)
    by_split: dict[str, list[int]] = {}
    for split, index in units:
        by_split.setdefault(split, []).append(index)
    written = []
    for split, indices in by_split.items():
        written += write_split_shards(
            dataset,
            split,
            pairs[split],
            cache.embeddings,
            cache.ids,
            Path(s.dir),
            s.samples_per_shard,
            only=indices,
            use_rank=s.use_rank,
            random_seed=s.random_report_seed,
            image=plan["image"],
            order=split_order(plan, split, Path(s.dir) / PLAN),
        )
    return written


def _write_manifest(
    cfg, dataset: ImageDataset, texts: list, cache: _TextCache, plan: dict, pairs: dict[str, dict], written: list[Path]
) -> Path:
    """texts.jsonl, then the manifest (written last: its presence marks the set complete). Shards this
    process did not write are read back against the pairs first (writer.write_manifest)."""
    s = cfg.shards
    out = Path(s.dir)
    extra = {k: plan[k] for k in ("texts", "selection", "image", "pairs", "order")}
    extra.update({"reports": cfg.reports.path, "pairing_model": cfg.pairing.model})
    selected = {
        split: SplitTexts.select(pairs[split], split, cache.embeddings, cache.ids, s.use_rank, s.random_report_seed)
        for split in dataset.splits
    }
    write_texts(out, texts)
    return write_manifest(
        dataset, out, s.samples_per_shard, cache.dim, cache.identity, extra=extra, texts=selected, written=written
    )
