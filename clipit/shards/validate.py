"""Checking a shard set. `validate_shards` (`clipit shard validate`) checks the manifest's checksums and
counts and, unless quick, reads every sample; `verify_shard_set` is the once-per-run check of training
(checksums and counts, each tar hashed once; unchanged tars are not hashed again). `SampleChecker` is
the check of one sample, shared with the manifest step's read-back (writer.write_manifest).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from clipit.data.base import ImageDecodeError
from clipit.errors import ClipitError, one_line
from clipit.io import atomic_write_json, read_json, sha256_file
from clipit.progress import progress
from clipit.shards.codec import IMAGE_FIELDS, PNG, decode_embedding, field_codec, sample_pixels
from clipit.shards.manifest import (
    MANIFEST,
    MANIFEST_FIX,
    REBUILD,
    VERIFIED,
    ShardError,
    check_manifest,
    image_spec,
    load_manifest,
    sample_key,
    short,
)
from clipit.shards.order import split_order
from clipit.shards.reader import scan_shard

META_KEYS = ("report_id", "report_index", "score", "rank", "topk_report_indices", "split", "source_key")


class SampleChecker:
    """The checks of one sample against its set (deep validation and the manifest's read-back)."""

    def __init__(
        self,
        n_classes: int,
        dim: int,
        num_texts: int | None = None,
        selection: dict | None = None,
        image: dict | None = None,
    ):
        self.n_classes, self.dim, self.num_texts = n_classes, dim, num_texts
        self.image = image or PNG
        mode = (selection or {}).get("mode")
        self.rank = (selection or {}).get("rank") if mode == "rank" else None
        self.check_rank = mode in ("rank", "random")
        self.seen: dict[str, str] = {}  # key -> shard it was first seen in
        self.labels: dict[str, dict[str, int]] = {}  # split -> label -> count

    @classmethod
    def of(cls, manifest: dict) -> SampleChecker:
        return cls(
            len(manifest["classes"]),
            manifest["embedding"]["dim"],
            (manifest.get("texts") or {}).get("count"),
            manifest.get("selection"),
            image_spec(manifest),
        )

    def check(self, sample: dict, path: Path, split: str, index: int, expect: dict | None = None) -> None:
        key = sample["__key__"]
        where = f"{path}: sample {key}"

        def bad(what: str) -> ShardError:
            return ShardError(f"{where}: {what}; {REBUILD}")

        if key in self.seen:
            raise bad(f"key appears twice in the set (also in {self.seen[key]})")
        self.seen[key] = Path(path).name
        want = sample_key(split, index)
        if key != want:
            raise bad(f"key where this place of the set has {want}")
        images = [f for f in IMAGE_FIELDS if f in sample]
        if len(images) != 1:
            raise bad("no image field" if not images else f"two images ({', '.join(images)})")
        codec = self.image["codec"]
        if field_codec(images[0]) != codec:
            raise bad(
                f"its image is stored as {images[0]}, but the manifest's image codec is {codec} (a shard of "
                "another build)"
            )
        for field in ("cls", "emb.npy", "json"):
            if field not in sample:
                raise bad(f"no {field}")
        try:
            meta = json.loads(sample["json"])
        except (UnicodeDecodeError, ValueError) as err:
            raise bad(f"json does not parse ({one_line(err)})") from None
        problem = self._meta_problem(meta, split)
        if problem:
            raise bad(f"json {problem}")
        try:
            sample_pixels(sample, meta)
        except ImageDecodeError as err:
            raise bad(f"its {images[0]} image does not decode ({err})") from None
        try:
            label = int(sample["cls"].decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            raise bad(f"cls is not an integer ({sample['cls'][:20]!r})") from None
        if not 0 <= label < self.n_classes:
            raise bad(f"label {label} outside the manifest's {self.n_classes} classes")
        try:
            emb = decode_embedding(sample["emb.npy"])
        except Exception as err:  # np.load raises several types for bytes that are no .npy
            raise bad(f"emb.npy is no .npy array ({one_line(err)})") from None
        if emb.dtype != np.float16 or emb.shape != (self.dim,):
            raise bad(f"emb.npy is {emb.dtype} {emb.shape}, the manifest says float16 ({self.dim},)")
        if not np.isfinite(emb).all():
            raise bad("emb.npy holds NaN or inf")
        for field in ("cls", "emb.npy", "json"):
            if expect and field in expect and sample[field] != expect[field]:
                raise bad(
                    f"its {field} differs from what the pairs and texts give (a shard of another build, or corrupt)"
                )
        if expect and "source_key" in expect and meta["source_key"] != expect["source_key"]:
            raise bad(f"json source_key {meta['source_key']!r} where the dataset has {expect['source_key']!r}")
        counts = self.labels.setdefault(split, {})
        counts[str(label)] = counts.get(str(label), 0) + 1

    def _meta_problem(self, meta, split: str) -> str | None:
        def integer(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def text_index(v):
            return integer(v) and v >= 0 and (self.num_texts is None or v < self.num_texts)

        if not isinstance(meta, dict):
            return f"is a {type(meta).__name__}, not an object"
        missing = [k for k in META_KEYS if k not in meta]
        if missing:
            return f"lacks {', '.join(missing)}"
        if not text_index(meta["report_index"]):
            return f"report_index {meta['report_index']!r} is not a text of this set ({self.num_texts} texts)"
        if not isinstance(meta["report_id"], str):
            return f"report_id {meta['report_id']!r} is not a string"
        score = meta["score"]
        if score is not None and not (
            isinstance(score, (int, float)) and not isinstance(score, bool) and math.isfinite(score)
        ):
            return f"score {score!r} is not a finite number"
        if self.check_rank and meta["rank"] != self.rank:
            return f"rank {meta['rank']!r} where the manifest's selection gives {self.rank!r}"
        if meta["rank"] is not None and not (integer(meta["rank"]) and meta["rank"] >= 1):
            return f"rank {meta['rank']!r} is not a rank"
        topk = meta["topk_report_indices"]
        if not (isinstance(topk, list) and topk and all(text_index(v) for v in topk)):
            return f"topk_report_indices {short(topk, 40)} are not texts of this set"
        if meta["split"] != split:
            return f"split {meta['split']!r} in a shard of {split!r}"
        if not (isinstance(meta["source_key"], str) and meta["source_key"]):
            return f"source_key {meta['source_key']!r} is not a key"
        if self.image["codec"] == "raw" and meta.get("image_shape") != self.image["shape"]:
            return f"image_shape {short(meta.get('image_shape'), 30)} where the manifest's raw codec has {self.image['shape']}"
        return None


def on_sample(
    checker: SampleChecker,
    path: Path,
    split: str,
    shard: int,
    per_shard: int,
    count: int,
    expect: Callable[[int], dict] | None = None,
    order: np.ndarray | None = None,
) -> Callable[[dict, int], None]:
    """scan_shard's callback for shard `shard` of `split`: sample j is at write position shard * per_shard + j
    of the split, which holds dataset sample `order[position]` (the position itself without an order)."""

    def check(sample: dict, j: int) -> None:
        if j >= count:
            raise ShardError(f"{path}: more samples than the {count} this shard holds; {REBUILD}")
        index = shard * per_shard + j
        index = index if order is None else int(order[index])
        checker.check(sample, path, split, index, expect(index) if expect else None)

    return check


def _missing(path: Path) -> ShardError:
    return ShardError(
        f"{path}: listed in the manifest but missing; rerun `clipit shard build --config <config>` "
        "(it rebuilds the missing shards)"
    )


def _checksum_error(path: Path) -> ShardError:
    return ShardError(f"{path}: checksum differs from the manifest; the shard is corrupt: {REBUILD}")


def validate_shards(shard_dir: str | Path, quick: bool = False) -> dict:
    """`clipit shard validate`: the manifest agrees with itself, every listed shard exists and has its sha256;
    then (unless `quick`) every sample is read: the tar is whole, keys are those of the sample's place in
    the set (so unique), the image is stored with the manifest's codec and decodes fully (raw: its bytes
    fill the recorded shape), the label is one of the manifest's classes, emb.npy is float16 of the
    manifest's dimension and finite, json parses and its fields are sane, and the counts (per shard and
    per class) are the manifest's. Returns the sample count per split."""
    shard_dir = Path(shard_dir)
    manifest = load_manifest(shard_dir)
    check_manifest(shard_dir, manifest)
    per_shard = manifest["samples_per_shard"]
    checker = SampleChecker.of(manifest)
    orders = {split: split_order(manifest, split, shard_dir / MANIFEST) for split in manifest["splits"]}
    listed = [(split, i, shard) for split, info in manifest["splits"].items() for i, shard in enumerate(info["shards"])]
    for split, i, shard in progress(listed, desc=f"{'hash' if quick else 'validate'} {shard_dir}", unit="shard"):
        path = shard_dir / shard["path"]
        if not path.is_file():
            raise _missing(path)
        if quick:
            sha, count, problem = sha256_file(path), shard["count"], None
        else:
            check = on_sample(checker, path, split, i, per_shard, shard["count"], order=orders[split])
            sha, count, problem = scan_shard(path, check)
        if sha != shard["sha256"]:
            raise _checksum_error(path)
        if problem is not None:
            raise problem
        if count != shard["count"]:
            raise ShardError(f"{path}: {count} samples, the manifest says {shard['count']}; {REBUILD}")
    for split, info in manifest["splits"].items():
        if not quick and checker.labels.get(split, {}) != info["class_counts"]:
            raise ShardError(
                f"{shard_dir / MANIFEST}: split {split} class_counts {short(info['class_counts'], 60)} "
                f"but the shards hold {short(checker.labels.get(split, {}), 60)}; {MANIFEST_FIX}"
            )
    return {split: info["count"] for split, info in manifest["splits"].items()}


def _stamp(st: os.stat_result, sha256: str) -> dict:
    return {
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
        "ino": st.st_ino,
        "sha256": sha256,
    }


def verify_shard_set(shard_dir: str | Path, manifest: dict) -> None:
    """Once per training run: the manifest agrees with itself and every shard it lists is on disk with its
    sha256 (so its samples and counts are those the manifest step read back). Raises ShardError (one line:
    the shard and the fix).

    Each tar is hashed once. A tar found unchanged since an earlier call verified it (same size, mtime_ns,
    ctime_ns and inode, and the manifest still lists the sha256 it had then) is not hashed again: the
    results are kept in <shard_dir>/.manifest.verified.json (not written when the folder is read-only).
    Rewriting, replacing, copying or touching a tar changes its ctime (which no user can set) and so
    forces a new hash; only a change below the file system (bit rot) would go unseen until
    `clipit shard validate`, which always hashes and decodes everything."""
    shard_dir = Path(shard_dir)
    check_manifest(shard_dir, manifest)
    cache_path = shard_dir / VERIFIED
    try:
        cache = read_json(cache_path)
        cache = cache if isinstance(cache, dict) else {}
    except (OSError, ValueError):
        cache = {}
    fresh = {}
    for info in manifest["splits"].values():
        for shard in info["shards"]:
            path, sha = shard_dir / shard["path"], shard["sha256"]
            try:
                stamp = _stamp(path.stat(), sha)
            except FileNotFoundError:
                raise _missing(path) from None
            if cache.get(shard["path"]) != stamp:
                if sha256_file(path) != sha:
                    raise _checksum_error(path)
                if _stamp(path.stat(), sha) != stamp:  # changed while it was hashed: verified, but not cacheable
                    continue
            fresh[shard["path"]] = stamp
    if fresh != cache:
        try:
            atomic_write_json(cache_path, fresh, indent=None)
        except (OSError, ClipitError):  # a read-only or full shard folder: verified all the same, only not cached
            pass
