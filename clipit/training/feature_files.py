"""The feature cache's files (clipit/training/features.py builds it): writing them, checking them against
the manifest and loading a split.

One cache per key, `<shards.dir>/features/<key>/` (clipit/layout.py). Files:
    <split>/<split>-NNNNNN.safetensors   shard NNNNNN's samples in tar order: features [n, D] (the
                                          backbone's output dtype), labels int64 [n], text_emb fp16 [n, T];
                                          the sample keys in the header's metadata
    manifest.json                         identity, per split the count, dim, dtype and every file's
                                          count and sha256; written last: its presence marks the cache complete
Every file is written atomically. Each use checks every file against the manifest (sha256, dtype, shape,
count) and its recorded identity against the requested one (a reused cache is exactly the one asked for);
anything else is one FeatureCacheError line naming the file and the fix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from clipit import layout
from clipit.errors import ClipitError, one_line
from clipit.identity import identity_changes
from clipit.io import atomic_path, atomic_write_json, read_json, sha256_file

FORMAT = 1
SPLITS = ("train", "val")  # what training reads; test evaluation runs the model as exported
MANIFEST = "manifest.json"


class FeatureCacheError(ClipitError):
    """A feature cache on disk is damaged or does not match its manifest."""


def damaged(file: Path, cache_dir: Path, problem: str) -> FeatureCacheError:
    return FeatureCacheError(
        f"{file}: {problem}; the feature cache is damaged: delete {cache_dir} and rerun "
        "`clipit train --config <config> --method <method>` (it rebuilds the cache)"
    )


@dataclass
class FeatureSplit:
    """One split of a cache in memory, in shard order; `rows[i]` are the rows of shard i."""

    features: torch.Tensor
    labels: torch.Tensor
    text_emb: torch.Tensor
    keys: list[str]
    rows: list[range]


def write_part(cache_dir: Path, split: str, index: int, url: str, parts: list) -> None:
    feats = torch.cat([p[0] for p in parts])
    keys = [k for p in parts for k in p[3]]
    bad = (~torch.isfinite(feats.float()).all(dim=1)).nonzero().flatten().tolist()
    if bad:
        raise FeatureCacheError(
            f"{url}: the backbone gives non-finite features for {len(bad)} samples (e.g. "
            f"{keys[bad[0]]}); check the backbone's weights and these images"
        )
    tensors = {
        "features": feats.contiguous(),
        "labels": torch.cat([p[1] for p in parts]).contiguous(),
        "text_emb": torch.cat([p[2] for p in parts]).to(torch.float16).contiguous(),
    }
    with atomic_path(layout.feature_part(cache_dir, split, index)) as tmp:
        save_file(tensors, str(tmp), metadata={"keys": json.dumps(keys), "shard": Path(url).name})


def write_manifest(cache_dir: Path, identity: dict, manifest: dict) -> None:
    splits = {}
    for split in SPLITS:
        files, dims = [], set()
        for i, shard in enumerate(manifest["splits"][split]["shards"]):
            file = layout.feature_part(cache_dir, split, i)
            shapes, _ = _header(file, cache_dir)
            if shapes["features"][0][0] != shard["count"]:
                raise damaged(file, cache_dir, f"holds {shapes['features'][0][0]} samples, its shard {shard['count']}")
            dims.add((shapes["features"][0][1], shapes["features"][1], shapes["text_emb"][0][1]))
            files.append(
                {"path": file.relative_to(cache_dir).as_posix(), "count": shard["count"], "sha256": sha256_file(file)}
            )
        if len(dims) != 1:
            raise FeatureCacheError(
                f"{cache_dir / split}: shard files of different widths or dtypes {sorted(dims)}; "
                f"delete {cache_dir} and rerun"
            )
        ((dim, dtype, text_dim),) = dims
        splits[split] = {
            "count": sum(f["count"] for f in files),
            "dim": dim,
            "dtype": dtype,
            "text_dim": text_dim,
            "files": files,
        }
    atomic_write_json(
        cache_dir / MANIFEST, {"format": FORMAT, "key": cache_dir.name, "identity": identity, "splits": splits}
    )


def _header(file: Path, cache_dir: Path) -> tuple[dict, list[str]]:
    """({tensor name: (shape, dtype)}, sample keys) of a shard file, or `damaged` naming it."""
    if not file.is_file():
        raise damaged(file, cache_dir, "missing")
    try:
        with safe_open(str(file), framework="pt") as fh:
            shapes = {
                name: (list(fh.get_slice(name).get_shape()), str(fh.get_slice(name).get_dtype())) for name in fh.keys()
            }
            keys = json.loads((fh.metadata() or {}).get("keys", "null"))
    except (SafetensorError, OSError, ValueError) as err:
        raise damaged(file, cache_dir, f"not a readable safetensors file ({one_line(err)})") from None
    if (
        set(shapes) != {"features", "labels", "text_emb"}
        or not isinstance(keys, list)
        or len({len(keys), shapes["features"][0][0], shapes["labels"][0][0], shapes["text_emb"][0][0]}) != 1
    ):
        raise damaged(file, cache_dir, "not a feature-cache shard file (tensors or keys missing or of other lengths)")
    return shapes, keys


def check_cache_identity(cache_dir: Path, cache_manifest: dict, identity: dict) -> None:
    """The cache's recorded identity must be the one its key was hashed from: the key is content-addressed,
    so another config finds another folder and never this one; a mismatch means the folder was copied or
    edited by hand, and its features are not the ones asked for."""
    changes = identity_changes(cache_manifest.get("identity") or {}, identity)
    if changes:
        raise damaged(cache_dir / MANIFEST, cache_dir, f"it records another identity than its key ({changes})")


def verify_cache(cache_dir: Path) -> dict:
    """The cache's manifest, once every file it lists is on disk with its sha256."""
    path = cache_dir / MANIFEST
    try:
        cache_manifest = read_json(path)
        files = [f for split in SPLITS for f in cache_manifest["splits"][split]["files"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise damaged(path, cache_dir, f"unreadable ({one_line(err)})") from None
    for entry in files:
        file = cache_dir / entry["path"]
        if not file.is_file():
            raise damaged(file, cache_dir, "missing")
        if sha256_file(file) != entry["sha256"]:
            raise damaged(file, cache_dir, "its sha256 differs from the cache's manifest")
    return cache_manifest


def load_split(cache_dir: Path, cache_manifest: dict, split: str, device) -> FeatureSplit:
    """One split, every file checked against the manifest (count, dim, dtype)."""
    info = cache_manifest["splits"][split]
    feats, labels, texts, keys, rows, start = [], [], [], [], [], 0
    for entry in info["files"]:
        file = cache_dir / entry["path"]
        shapes, file_keys = _header(file, cache_dir)
        want = ([entry["count"], info["dim"]], info["dtype"])
        if shapes["features"] != want or shapes["text_emb"][0] != [entry["count"], info["text_dim"]]:
            raise damaged(file, cache_dir, f"features {shapes['features']} where the manifest says {want}")
        tensors = load_file(str(file))
        for name in ("features", "text_emb"):  # written finite: a non-finite value was put there afterwards
            rows_bad = (~torch.isfinite(tensors[name].float()).all(dim=1)).nonzero().flatten().tolist()
            if rows_bad:
                raise damaged(file, cache_dir, f"{name} of sample {file_keys[rows_bad[0]]} is not finite")
        keys += file_keys
        feats.append(tensors["features"])
        labels.append(tensors["labels"])
        texts.append(tensors["text_emb"])
        rows.append(range(start, start + entry["count"]))
        start += entry["count"]
    return FeatureSplit(torch.cat(feats).to(device), torch.cat(labels), torch.cat(texts).float().to(device), keys, rows)
