"""WebDataset shards: one sample = image bytes as stored + label + paired text embedding (fp16).

Layout under the shard directory:
    <split>/<split>-<shard:06d>.tar   samples [i * samples_per_shard, (i + 1) * samples_per_shard)
    build.json                        the build plan (dataset, counts, embedding, selection), written first
    manifest.json                     the plan + shard list with sha256 and class counts, written last
Each sample holds `<ext>` (png/jpg/tif bytes), `cls` (label), `emb.npy` (fp16 [D]) and `json`
(text id and index, similarity, rank, top-k indices, split, source key).

Building a config's set (pairing checks, parts, manifest) is clipit/shards/stage.py.
Compute nodes: the shards of all splits are enumerated in a fixed order (split by split, index by
index) and part I of N writes every N-th of them, so a SLURM array builds the set in parallel. Every
shard is written under a temporary name, fsynced and renamed; a killed part leaves only whole shards
(its stale temporary files are removed when the part reruns). The part that finds all shards present
writes the manifest (or `--finalize` does). Shards are byte-identical across reruns and across part
layouts: tar headers carry a fixed mtime, owner and mode, fields are sorted, nothing is compressed.
Images are decoded once while writing, so a corrupt image fails the build, not the training run.
"""
from __future__ import annotations

import functools
import io
import json
import os
import zlib
from pathlib import Path
from typing import Iterable

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from clipit.errors import ClipitError
from clipit.data.base import DatasetError, ImageDataset
from clipit.io import atomic_path, atomic_write_json, atomic_write_text, read_json, sha256_file

MANIFEST = "manifest.json"
PLAN = "build.json"
TEXTS = "texts.jsonl"  # the paired texts in report_index order: what a trainable text tower encodes
FORMAT = "clipit-shards/1"
# Fixed tar header fields: webdataset's TarWriter stamps time.time() unless told otherwise.
TAR_MTIME = 0
TAR_OWNER = "clipit"
TAR_MODE = 0o444
# Plan keys that must agree between parts, reruns and the manifest.
PLAN_KEYS = ("format", "dataset", "classes", "samples_per_shard", "counts", "embedding", "texts", "selection")


class ShardError(ClipitError):
    """Shards on disk disagree with their manifest or inputs (one line, names the file and the fix)."""


def encode_embedding(vector: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(vector, dtype=np.float16), allow_pickle=False)
    return buf.getvalue()


@functools.lru_cache(maxsize=16)
def _npy_header(dim: int) -> bytes:
    """The exact .npy header encode_embedding writes for a [dim] fp16 vector."""
    return encode_embedding(np.zeros(dim, dtype=np.float16))[: -2 * dim or None]


def decode_embedding(data: bytes) -> np.ndarray:
    """fp16 [D] from `emb.npy` bytes. The headers this module writes are recognised by comparison and
    skipped (~1 µs, read-only view); anything else goes through np.load (~30 µs, a hot spot in loading)."""
    for header_len in (128, 64, 192):
        dim = (len(data) - header_len) // 2
        if dim > 0 and len(data) == header_len + 2 * dim and data[:header_len] == _npy_header(dim):
            return np.frombuffer(data, dtype=np.float16, offset=header_len)
    return np.load(io.BytesIO(data), allow_pickle=False)


def shard_path(out_dir: str | Path, split: str, index: int) -> Path:
    return Path(out_dir) / split / f"{split}-{index:06d}.tar"


def num_shards(n_samples: int, samples_per_shard: int) -> int:
    return max(1, -(-n_samples // samples_per_shard))


# ---------------------------------------------------------------------------------------- one shard


def check_image(data: bytes) -> None:
    """Fully decode encoded image bytes (raises what PIL raises); ~0.1 ms for a 96-px PNG tile."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()


def write_tar(path: str | Path, samples: Iterable[dict]) -> Path:
    """Write samples to `path` atomically and deterministically (same samples -> same bytes)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            with wds.TarWriter(fh, user=TAR_OWNER, group=TAR_OWNER, mode=TAR_MODE, mtime=TAR_MTIME,
                               encoder=False) as sink:
                for sample in samples:
                    sink.write(sample)
    return path


def remove_stale_temps(path: Path) -> None:
    """Temporary files a killed writer of this shard left behind (atomic_path names them .<name>.*.tmp)."""
    if path.parent.is_dir():
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            stale.unlink(missing_ok=True)


def select_texts(pairs: dict[str, np.ndarray], split: str, use_rank: int = 1, random_seed: int | None = None,
                 num_texts: int | None = None, where: str = "pairs") -> tuple[np.ndarray, np.ndarray]:
    """The text index and score each image of `split` gets: its `use_rank`-th best (1 = top-1), or with
    `random_seed` a uniformly random text (seeded per split; score NaN, as it was never computed)."""
    n = len(pairs["indices"])
    if random_seed is not None:
        if not num_texts:
            raise ShardError("a random text per image needs the number of texts")
        rng = np.random.default_rng([int(random_seed), zlib.crc32(split.encode())])
        return rng.integers(0, num_texts, n, dtype=np.int64), np.full(n, np.nan, dtype=np.float32)
    k = pairs["indices"].shape[1]
    if not 1 <= use_rank <= k:
        raise ShardError(f"{where}: shards.use_rank={use_rank} but the pairs hold the top {k}; set pairing.top_k "
                         f">= {use_rank} and rerun `clipit pair`" if use_rank > k else
                         f"shards.use_rank={use_rank} must be >= 1")
    return pairs["indices"][:, use_rank - 1].astype(np.int64), pairs["scores"][:, use_rank - 1].astype(np.float32)


def write_split_shards(dataset: ImageDataset, split: str, pairs: dict[str, np.ndarray], text_embeddings: np.ndarray,
                       report_ids: list[str], out_dir: str | Path, samples_per_shard: int = 1000,
                       only: Iterable[int] | None = None, use_rank: int = 1,
                       random_seed: int | None = None) -> list[Path]:
    """Write the shards of one split (or just the shard indices in `only`); finished shards are skipped."""
    from clipit.pairing.engine import decode_error

    n = dataset.split_size(split)
    if len(pairs["indices"]) != n:
        raise ShardError(f"{split}: pairs cover {len(pairs['indices'])} images but the dataset has {n}; re-run pairing")
    chosen, scores = select_texts(pairs, split, use_rank, random_seed, len(report_ids))
    rank = None if random_seed is not None else use_rank
    written = []
    todo = list(range(num_shards(n, samples_per_shard)) if only is None else only)
    for shard in tqdm(todo, desc=f"shards {split}", unit="shard", leave=False):
        path = shard_path(out_dir, split, shard)
        written.append(path)
        if path.exists():
            continue
        remove_stale_temps(path)

        def samples(shard=shard):
            for index in range(shard * samples_per_shard, min(n, (shard + 1) * samples_per_shard)):
                item = dataset.sample(split, index)
                try:
                    check_image(item.data)
                except Exception as err:  # PIL raises several types for undecodable bytes
                    raise decode_error(dataset, item, err) from None
                yield _sample(item, split, index, int(chosen[index]), float(scores[index]), rank,
                              pairs["indices"][index], text_embeddings, report_ids)

        write_tar(path, samples())
    return written


def _sample(item, split, index, text_index, score, rank, topk, text_embeddings, report_ids) -> dict:
    meta = {
        "report_id": report_ids[text_index],
        "report_index": text_index,
        "score": None if np.isnan(score) else score,
        "rank": rank,  # None: a random text (the control), not a retrieved one
        "topk_report_indices": [int(i) for i in topk],
        "split": split,
        "source_key": item.key,
    }
    return {
        "__key__": f"{split}_{index:08d}",  # dot-free and unique across splits
        item.ext: item.data,
        "cls": str(item.label).encode(),
        "emb.npy": encode_embedding(text_embeddings[text_index]),
        "json": json.dumps(meta).encode(),
    }


# ------------------------------------------------------------------------------- parts and manifest


def shard_units(dataset: ImageDataset, samples_per_shard: int) -> list[tuple[str, int]]:
    """Every (split, shard index) of the set, in the one order all parts agree on."""
    return [(split, i) for split in dataset.splits
            for i in range(num_shards(dataset.split_size(split), samples_per_shard))]


def part_units(units: list, part: int, num_parts: int) -> list:
    """Part `part` of `num_parts` takes every num_parts-th unit, starting at `part` (balanced across splits)."""
    if num_parts < 1 or not 0 <= part < num_parts:
        raise ShardError(f"--part {part} --num-parts {num_parts}: need 0 <= part < num-parts")
    return units[part::num_parts]


def missing_shards(dataset: ImageDataset, out_dir: str | Path, samples_per_shard: int) -> list[Path]:
    return [p for p in (shard_path(out_dir, s, i) for s, i in shard_units(dataset, samples_per_shard))
            if not p.exists()]


def write_manifest(dataset: ImageDataset, out_dir: str | Path, samples_per_shard: int, embedding_dim: int,
                   embedding_identity: dict, extra: dict | None = None) -> Path:
    """Summarise finished shards; written last, so its presence means the shard set is complete."""
    out_dir = Path(out_dir)
    splits = {}
    for split in dataset.splits:
        n = dataset.split_size(split)
        labels = dataset.labels(split)
        shards = []
        for i in range(num_shards(n, samples_per_shard)):
            path = shard_path(out_dir, split, i)
            if not path.exists():
                raise ShardError(f"{path}: shard missing; finish the build (rerun `clipit shard build`) before the manifest")
            count = min(n, (i + 1) * samples_per_shard) - i * samples_per_shard
            shards.append({"path": path.relative_to(out_dir).as_posix(), "count": count, "sha256": sha256_file(path)})
        splits[split] = {
            "count": n,
            "class_counts": {str(c): int(k) for c, k in zip(*np.unique(labels, return_counts=True))},
            "shards": shards,
        }
    manifest = {
        "format": FORMAT,
        "dataset": dataset.name,
        "classes": list(dataset.classes),
        "samples_per_shard": samples_per_shard,
        "counts": {split: dataset.split_size(split) for split in dataset.splits},
        "embedding": {"dim": int(embedding_dim), "dtype": "float16", "model": embedding_identity},
        "splits": splits,
        **(extra or {}),
    }
    path = out_dir / MANIFEST
    atomic_write_json(path, manifest)
    return path


def build_plan(dataset: ImageDataset, samples_per_shard: int, embedding_dim: int, embedding_identity: dict,
               texts: dict, selection: dict) -> dict:
    return json.loads(json.dumps({
        "format": FORMAT,
        "dataset": dataset.name,
        "classes": list(dataset.classes),
        "samples_per_shard": int(samples_per_shard),
        "counts": {split: dataset.split_size(split) for split in dataset.splits},
        "embedding": {"dim": int(embedding_dim), "dtype": "float16", "model": embedding_identity},
        "texts": texts,
        "selection": selection,
    }))


def check_plan(out_dir: Path, plan: dict) -> bool:
    """True when a manifest for exactly this plan exists; raises when shards of another plan are there."""
    for name in (MANIFEST, PLAN):
        path = out_dir / name
        if not path.exists():
            continue
        try:
            old = read_json(path)
        except ValueError:
            raise ShardError(f"{path}: unreadable; delete it and rerun `clipit shard build`") from None
        diff = [k for k in PLAN_KEYS if old.get(k) != plan.get(k)]
        if diff:
            key = diff[0]
            raise ShardError(f"{path}: the shards in {out_dir} were built with another {key} "
                             f"({_short(old.get(key))} vs now {_short(plan.get(key))}); delete {out_dir} "
                             "or set shards.dir to a new folder")
        if name == MANIFEST:
            return True
    return False


def _short(value, limit: int = 80) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def write_texts(out_dir: Path, texts: list) -> None:
    lines = [json.dumps({"id": t.id, "text": t.text}, ensure_ascii=False) + "\n" for t in texts]
    atomic_write_text(Path(out_dir) / TEXTS, "".join(lines))


# ------------------------------------------------------------------------------------------ reading


def load_texts(shard_dir: str | Path, manifest: dict | None = None) -> list[str]:
    """The texts that the samples' `report_index` points at, checked against the manifest's fingerprint."""
    from clipit.corpus import Report, corpus_fingerprint

    manifest = manifest or load_manifest(shard_dir)
    path = Path(shard_dir) / TEXTS
    fix = "rerun `clipit shard build --config <config>` (it writes the file without rebuilding the shards)"
    if not path.exists():
        raise ShardError(f"{path}: missing; {fix}")
    try:
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
        texts = [Report(str(r["id"]), str(r["text"])) for r in records]
    except (ValueError, KeyError, TypeError) as err:
        raise ShardError(f"{path}: unreadable ({err}); delete it and {fix}") from None
    if corpus_fingerprint(texts) != manifest.get("texts", {}).get("fingerprint"):
        raise ShardError(f"{path}: does not match the texts the shards were paired with; delete it and {fix}")
    return [t.text for t in texts]


def load_manifest(shard_dir: str | Path) -> dict:
    path = Path(shard_dir) / MANIFEST
    if not path.exists():
        raise ShardError(f"{path}: no manifest; build the shards first (`clipit shard build` or `clipit demo`)")
    return read_json(path)


def split_urls(shard_dir: str | Path, split: str, manifest: dict | None = None) -> list[str]:
    manifest = manifest or load_manifest(shard_dir)
    if split not in manifest["splits"]:
        raise ShardError(f"{shard_dir}: no split {split!r} in the manifest (has {sorted(manifest['splits'])})")
    return [os.fspath(Path(shard_dir) / s["path"]) for s in manifest["splits"][split]["shards"]]


def iter_samples(urls: list[str]):
    """Raw samples in shard order (no shuffling, no splitting): for tests, validation, evaluation."""
    yield from wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None)


def validate_shards(shard_dir: str | Path) -> dict:
    """Check counts, checksums, embedding dims, NaNs and label range against the manifest."""
    manifest = load_manifest(shard_dir)
    n_classes, dim = len(manifest["classes"]), manifest["embedding"]["dim"]
    summary = {}
    for split, info in manifest["splits"].items():
        seen = 0
        for shard in info["shards"]:
            path = Path(shard_dir) / shard["path"]
            if not path.exists():
                raise ShardError(f"{path}: listed in the manifest but missing; rebuild the shards")
            if sha256_file(path) != shard["sha256"]:
                raise ShardError(f"{path}: checksum differs from the manifest; the shard is corrupt, delete it and rebuild")
            count = 0
            for sample in iter_samples([os.fspath(path)]):
                label = int(sample["cls"])
                emb = decode_embedding(sample["emb.npy"])
                where = f"{path}:{sample['__key__']}"
                if not 0 <= label < n_classes:
                    raise ShardError(f"{where}: label {label} outside [0, {n_classes})")
                if emb.shape != (dim,):
                    raise ShardError(f"{where}: embedding shape {emb.shape}, manifest says ({dim},)")
                if not np.isfinite(emb).all():
                    raise ShardError(f"{where}: embedding has NaN/inf; re-run pairing")
                count += 1
            if count != shard["count"]:
                raise ShardError(f"{path}: {count} samples, manifest says {shard['count']}; rebuild this shard")
            seen += count
        if seen != info["count"]:
            raise ShardError(f"{shard_dir}: split {split} has {seen} samples, manifest says {info['count']}")
        summary[split] = seen
    return summary


__all__ = [
    "MANIFEST", "PLAN", "TEXTS", "ShardError", "DatasetError", "build_plan", "check_image", "check_plan", "decode_embedding",
    "encode_embedding", "iter_samples", "load_manifest", "load_texts", "missing_shards", "num_shards", "part_units",
    "select_texts", "shard_path", "shard_units", "split_urls", "validate_shards", "write_manifest",
    "write_split_shards", "write_tar", "write_texts",
]
