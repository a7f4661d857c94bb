"""Writing shards: one sample = the image (clipit/shards/codec.py: encoded as stored, or raw pixels) + label
+ paired text embedding (fp16) + json (text id and index, similarity, rank, top-k indices, split,
source key; raw sets add the image shape). Names and the manifest's files: clipit/shards/manifest.py.

Building a config's set (pairing checks, parts, manifest) is clipit/shards/stage.py.
The train split is written in a seeded permutation (clipit/shards/order.py), so every shard holds a random
sample of it rather than a run of one class; evaluation splits stay in dataset order.
Compute nodes: the shards of all splits are enumerated in a fixed order (split by split, index by
index) and part I of N writes every N-th of them, so a SLURM array builds the set in parallel. Every
shard is written under a temporary name, fsynced and renamed; a killed part leaves only whole shards
(its stale temporary files are removed when the part reruns). The part that finds all shards present
writes the manifest (or `--finalize` does). Shards are byte-identical across reruns and across part
layouts: tar headers carry a fixed mtime, owner and mode, fields are sorted, nothing is compressed.
Images are decoded once while writing, so a corrupt image fails the build, not the training run.

One writer: each shard is written under its own lock (<dir>/.locks/<split>-<index>/, clipit.locks), so
parts (or a part and a full build) never touch each other's temporary files; the directory lock
(build.json, texts.jsonl, manifest.json) is stage.py's. A manifest only lists shards that were written
by the process that writes it or read back sample by sample (every image decoded, the labels, texts
and embeddings equal to what the pairs give): see `write_manifest`.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds

from clipit.data.base import ImageDataset, ImageDecodeError
from clipit.io import atomic_path, atomic_write_json, sha256_file
from clipit.locks import exclusive
from clipit.progress import progress
from clipit.shards.codec import PNG, encode_embedding, encode_image
from clipit.shards.manifest import (
    FORMAT,
    LOCKS,
    MANIFEST,
    REBUILD,
    ShardError,
    num_shards,
    sample_key,
    shard_count,
    shard_path,
)
from clipit.shards.order import split_order
from clipit.shards.reader import scan_shard
from clipit.shards.validate import SampleChecker, on_sample

# Fixed tar header fields: webdataset's TarWriter stamps time.time() unless told otherwise.
TAR_MTIME = 0
TAR_OWNER = "clipit"
TAR_MODE = 0o444
SHARD_LOCK_WAIT_S = 3600.0  # a shard another process is writing: wait for it (one shard takes seconds to minutes)


def write_tar(path: str | Path, samples: Iterable[dict]) -> Path:
    """Write samples to `path` atomically and deterministically (same samples -> same bytes)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            with wds.TarWriter(
                fh, user=TAR_OWNER, group=TAR_OWNER, mode=TAR_MODE, mtime=TAR_MTIME, encoder=False
            ) as sink:
                for sample in samples:
                    sink.write(sample)
    return path


def remove_stale_temps(path: Path) -> None:
    """Temporary files a killed writer of `path` left behind (atomic_path names them .<name>.*.tmp).
    Only safe under the lock of whoever writes `path`: a live writer's temporary file looks the same."""
    if path.parent.is_dir():
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            stale.unlink(missing_ok=True)


def shard_lock(out_dir: str | Path, split: str, index: int, wait_s: float = SHARD_LOCK_WAIT_S):
    """The lock of one shard's writer: another process writing the same shard is waited for."""
    name = shard_path(out_dir, split, index).name
    return exclusive(Path(out_dir) / LOCKS / name.removesuffix(".tar"), f"shard {name}", wait_s=wait_s, poll_s=0.2)


def select_texts(
    pairs: dict[str, np.ndarray],
    split: str,
    use_rank: int = 1,
    random_seed: int | None = None,
    num_texts: int | None = None,
    where: str = "pairs",
) -> tuple[np.ndarray, np.ndarray]:
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
        raise ShardError(
            f"{where}: shards.use_rank={use_rank} but the pairs hold the top {k}; set pairing.top_k "
            f">= {use_rank} and rerun `clipit pair`"
            if use_rank > k
            else f"shards.use_rank={use_rank} must be >= 1"
        )
    return pairs["indices"][:, use_rank - 1].astype(np.int64), pairs["scores"][:, use_rank - 1].astype(np.float32)


@dataclass(frozen=True)
class SplitTexts:
    """What the samples of one split pair with: per image the selected text and its score, the top-k
    indices, and the rank (None: a random text). The one home of a sample's fields besides its image, so
    the writer and the manifest's check of shards it did not write agree byte for byte."""

    split: str
    chosen: np.ndarray
    scores: np.ndarray
    rank: int | None
    topk: np.ndarray
    text_embeddings: np.ndarray
    report_ids: list

    @classmethod
    def select(
        cls,
        pairs: dict[str, np.ndarray],
        split: str,
        text_embeddings: np.ndarray,
        report_ids: list,
        use_rank: int = 1,
        random_seed: int | None = None,
    ) -> SplitTexts:
        chosen, scores = select_texts(pairs, split, use_rank, random_seed, len(report_ids))
        return cls(
            split,
            chosen,
            scores,
            None if random_seed is not None else use_rank,
            pairs["indices"],
            text_embeddings,
            report_ids,
        )

    def fields(self, index: int, source_key: str, label: int, image: dict = PNG) -> dict:
        """Every field of sample `index` except the image (`__key__`, `cls`, `emb.npy`, `json`); a raw
        `image` codec puts its shape in the json (readers need no manifest)."""
        text_index, score = int(self.chosen[index]), float(self.scores[index])
        meta = {
            "report_id": self.report_ids[text_index],
            "report_index": text_index,
            "score": None if np.isnan(score) else score,
            "rank": self.rank,  # None: a random text (the control), not a retrieved one
            "topk_report_indices": [int(i) for i in self.topk[index]],
            "split": self.split,
            "source_key": source_key,
        } | ({"image_shape": image["shape"]} if image["codec"] == "raw" else {})
        return {
            "__key__": sample_key(self.split, index),
            "cls": str(label).encode(),
            "emb.npy": encode_embedding(self.text_embeddings[text_index]),
            "json": json.dumps(meta).encode(),
        }


def write_split_shards(
    dataset: ImageDataset,
    split: str,
    pairs: dict[str, np.ndarray],
    text_embeddings: np.ndarray,
    report_ids: list[str],
    out_dir: str | Path,
    samples_per_shard: int = 1000,
    only: Iterable[int] | None = None,
    use_rank: int = 1,
    random_seed: int | None = None,
    image: dict = PNG,
    order: np.ndarray | None = None,
) -> list[Path]:
    """Write the shards of one split (or just the shard indices in `only`) with the `image` codec
    (codec.resolve_image); returns the shards this call wrote. Shards that exist are skipped; a shard
    another process is writing is waited for, then skipped. `order`: the dataset index at each write
    position (order.split_order: the train split's seeded permutation); None writes dataset order.
    A sample keeps its dataset index (key, text, label) wherever it is written."""
    from clipit.pairing.engine import decode_error

    n = dataset.split_size(split)
    if len(pairs["indices"]) != n:
        raise ShardError(f"{split}: pairs cover {len(pairs['indices'])} images but the dataset has {n}; re-run pairing")
    texts = SplitTexts.select(pairs, split, text_embeddings, report_ids, use_rank, random_seed)
    written = []
    todo = list(range(num_shards(n, samples_per_shard)) if only is None else only)
    for shard in progress(todo, desc=f"write {split} shards", unit="shard"):
        path = shard_path(out_dir, split, shard)
        if path.exists():
            continue

        def samples(shard=shard):
            for position in range(shard * samples_per_shard, min(n, (shard + 1) * samples_per_shard)):
                index = position if order is None else int(order[position])
                item = dataset.sample(split, index)
                try:
                    field, payload, _ = encode_image(item.data, item.ext, image)
                except ImageDecodeError as err:
                    raise decode_error(dataset, item, err) from None
                except ValueError as err:  # another size than the raw set's
                    raise ShardError(
                        f"{dataset.name} {split} image {item.key}: {err}; set shards.codec: png for a "
                        "dataset of mixed sizes (and delete the shard folder)"
                    ) from None
                yield texts.fields(index, item.key, item.label, image) | {field: payload}

        with shard_lock(out_dir, split, shard):
            if path.exists():  # another process wrote it while this one waited
                continue
            remove_stale_temps(path)  # a dead writer's: a live one would hold the lock
            write_tar(path, samples())
        written.append(path)
    return written


# ------------------------------------------------------------------------------- parts and manifest


def shard_units(dataset: ImageDataset, samples_per_shard: int) -> list[tuple[str, int]]:
    """Every (split, shard index) of the set, in the one order all parts agree on."""
    return [
        (split, i) for split in dataset.splits for i in range(num_shards(dataset.split_size(split), samples_per_shard))
    ]


def part_units(units: list, part: int, num_parts: int) -> list:
    """Part `part` of `num_parts` takes every num_parts-th unit, starting at `part` (balanced across splits)."""
    if num_parts < 1 or not 0 <= part < num_parts:
        raise ShardError(f"--part {part} --num-parts {num_parts}: need 0 <= part < num-parts")
    return units[part::num_parts]


def missing_shards(dataset: ImageDataset, out_dir: str | Path, samples_per_shard: int) -> list[Path]:
    return [
        p for p in (shard_path(out_dir, s, i) for s, i in shard_units(dataset, samples_per_shard)) if not p.exists()
    ]


def write_manifest(
    dataset: ImageDataset,
    out_dir: str | Path,
    samples_per_shard: int,
    embedding_dim: int,
    embedding_identity: dict,
    extra: dict | None = None,
    texts: dict[str, SplitTexts] | None = None,
    written: Iterable[str | Path] = (),
) -> Path:
    """Summarise finished shards; written last, so its presence means the shard set is complete. `extra`
    holds the plan's other keys (texts, selection, image, order; without `image` the set is png, without
    `order` every split is in dataset order).

    Never blesses unchecked bytes: a shard in `written` (written by this process, in this run) is hashed;
    every other one is read back once, sample by sample, before it is listed: the tar must be whole, the
    keys and counts those of its place in the set, every image must decode with the set's codec, and the
    labels, source keys, embeddings (exact fp16 bytes) and json equal what the dataset and `texts` (per
    split: the pairs' selection; without it the json is only checked for sanity) give. What is not compared
    is whether an image's bytes are the source's own: that would mean reading the whole dataset again. A
    shard that fails is refused with one line: delete it and rerun `clipit shard build`."""
    out_dir = Path(out_dir)
    written = {os.path.abspath(p) for p in written}
    extra = extra or {}
    image = extra.get("image", PNG)
    checker = SampleChecker(
        len(dataset.classes), int(embedding_dim), (extra.get("texts") or {}).get("count"), extra.get("selection"), image
    )
    units = shard_units(dataset, samples_per_shard)
    orders = {split: split_order(extra, split, out_dir / MANIFEST) for split in dataset.splits}
    for path in (shard_path(out_dir, split, i) for split, i in units):
        if not path.exists():
            raise ShardError(
                f"{path}: shard missing; finish the build (rerun `clipit shard build --config <config>`) "
                "before the manifest"
            )
    keys: dict[str, list] = {}
    labels = {split: dataset.labels(split) for split in dataset.splits}
    shards: dict[str, list] = {split: [] for split in dataset.splits}
    unread = sum(os.path.abspath(shard_path(out_dir, s, i)) not in written for s, i in units)
    for split, i in progress(units, desc=f"manifest: read back {unread} shard(s)", unit="shard", enabled=unread > 0):
        path, n = shard_path(out_dir, split, i), dataset.split_size(split)
        count = shard_count(n, samples_per_shard, i)
        if os.path.abspath(path) in written:
            sha = sha256_file(path)
        else:
            if split not in keys:
                keys[split] = dataset.keys(split)
            expect = _expectation(split, keys[split], labels[split], (texts or {}).get(split), image)
            check = on_sample(checker, path, split, i, samples_per_shard, count, expect, orders[split])
            sha, got, problem = scan_shard(path, check)
            if problem is not None:
                raise problem
            if got != count:
                raise ShardError(f"{path}: {got} samples where this set's shard holds {count}; {REBUILD}")
        shards[split].append({"path": path.relative_to(out_dir).as_posix(), "count": count, "sha256": sha})
    splits = {
        split: {
            "count": dataset.split_size(split),
            "class_counts": {str(c): int(k) for c, k in zip(*np.unique(labels[split], return_counts=True))},
            "shards": shards[split],
        }
        for split in dataset.splits
    }
    manifest = {
        "format": FORMAT,
        "dataset": dataset.name,
        "classes": list(dataset.classes),
        "samples_per_shard": samples_per_shard,
        "counts": {split: dataset.split_size(split) for split in dataset.splits},
        "embedding": {"dim": int(embedding_dim), "dtype": "float16", "model": embedding_identity},
        "splits": splits,
        **extra,
    }
    path = out_dir / MANIFEST
    atomic_write_json(path, manifest)
    return path


def _expectation(
    split: str, keys: list, labels: np.ndarray, texts: SplitTexts | None, image: dict
) -> Callable[[int], dict]:
    """What sample `index` of a split must hold apart from its image: every field exactly with the split's
    texts, else its key, label and source key."""

    def expect(index: int) -> dict:
        if texts is not None:
            return texts.fields(index, keys[index], int(labels[index]), image)
        return {"__key__": sample_key(split, index), "cls": str(int(labels[index])).encode(), "source_key": keys[index]}

    return expect
