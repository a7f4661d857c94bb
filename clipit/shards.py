"""WebDataset shards: one sample = image bytes as stored + label + paired report embedding (fp16).

Layout under the shard directory:
    <split>/<split>-<shard:06d>.tar   samples [i * samples_per_shard, (i + 1) * samples_per_shard)
    manifest.json                     counts, classes, shard list with sha256, embedding identity
Each sample holds `<ext>` (png/jpg/tif bytes), `cls` (label), `emb.npy` (fp16 [D]) and `json`
(report id and index, similarity, split, source key). Shards are written under a temporary name and
renamed, so a killed build leaves only whole shards and a rerun skips them.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import webdataset as wds
from tqdm import tqdm

from clipit.data.base import ImageDataset
from clipit.io import atomic_path, atomic_write_json, read_json
from clipit.pairing.models import file_sha256

MANIFEST = "manifest.json"


class ShardError(ValueError):
    """Shards on disk disagree with their manifest (one line, names the shard and the fix)."""


def encode_embedding(vector: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(vector, dtype=np.float16), allow_pickle=False)
    return buf.getvalue()


def decode_embedding(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def shard_path(out_dir: str | Path, split: str, index: int) -> Path:
    return Path(out_dir) / split / f"{split}-{index:06d}.tar"


def num_shards(n_samples: int, samples_per_shard: int) -> int:
    return max(1, -(-n_samples // samples_per_shard))


def write_split_shards(dataset: ImageDataset, split: str, pairs: dict[str, np.ndarray], text_embeddings: np.ndarray,
                       report_ids: list[str], out_dir: str | Path, samples_per_shard: int = 1000,
                       only: list[int] | None = None) -> list[Path]:
    """Write the shards of one split (or just the shard indices in `only`); finished shards are skipped."""
    n = dataset.split_size(split)
    if len(pairs["indices"]) != n:
        raise ShardError(f"{split}: pairs cover {len(pairs['indices'])} images but the dataset has {n}; re-run pairing")
    written = []
    todo = range(num_shards(n, samples_per_shard)) if only is None else only
    for shard in tqdm(todo, desc=f"shards {split}", unit="shard", leave=False):
        path = shard_path(out_dir, split, shard)
        written.append(path)
        if path.exists():
            continue
        with atomic_path(path) as tmp:
            with wds.TarWriter(str(tmp)) as sink:
                for index in range(shard * samples_per_shard, min(n, (shard + 1) * samples_per_shard)):
                    sink.write(_sample(dataset, split, index, pairs, text_embeddings, report_ids))
    return written


def _sample(dataset, split, index, pairs, text_embeddings, report_ids) -> dict:
    item = dataset.sample(split, index)
    best = int(pairs["indices"][index, 0])
    meta = {
        "report_id": report_ids[best],
        "report_index": best,
        "score": float(pairs["scores"][index, 0]),
        "topk_report_indices": [int(i) for i in pairs["indices"][index]],
        "split": split,
        "source_key": item.key,
    }
    return {
        "__key__": f"{split}_{index:08d}",  # dot-free and unique across splits
        item.ext: item.data,
        "cls": str(item.label).encode(),
        "emb.npy": encode_embedding(text_embeddings[best]),
        "json": json.dumps(meta).encode(),
    }


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
                raise ShardError(f"{path}: shard missing; finish the build (rerun `clipit shard`) before the manifest")
            count = min(n, (i + 1) * samples_per_shard) - i * samples_per_shard
            shards.append({"path": path.relative_to(out_dir).as_posix(), "count": count, "sha256": file_sha256(path)})
        splits[split] = {
            "count": n,
            "class_counts": {str(c): int(k) for c, k in zip(*np.unique(labels, return_counts=True))},
            "shards": shards,
        }
    manifest = {
        "format": "clipit-shards/1",
        "dataset": dataset.name,
        "classes": list(dataset.classes),
        "samples_per_shard": samples_per_shard,
        "embedding": {"dim": int(embedding_dim), "dtype": "float16", "model": embedding_identity},
        "splits": splits,
        **(extra or {}),
    }
    path = out_dir / MANIFEST
    atomic_write_json(path, manifest)
    return path


def load_manifest(shard_dir: str | Path) -> dict:
    path = Path(shard_dir) / MANIFEST
    if not path.exists():
        raise ShardError(f"{path}: no manifest; build the shards first (`clipit shard` or `clipit demo`)")
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
            if file_sha256(path) != shard["sha256"]:
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
