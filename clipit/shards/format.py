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

One writer: each shard is written under its own lock (<dir>/.locks/<split>-<index>/, clipit.locks), so
parts (or a part and a full build) never touch each other's temporary files; the directory lock
(build.json, texts.jsonl, manifest.json) is stage.py's. A manifest only lists shards that were written
by the process that writes it or read back sample by sample (every image decoded, the labels, texts
and embeddings equal to what the pairs give): see `write_manifest`.

Checking a set: `validate_shards` (`clipit shard validate`) checks the manifest's checksums and counts
and, unless quick, decodes every sample; `verify_shard_set` is the once-per-run check of training
(checksums and counts, each tar hashed once; unchanged tars are not hashed again).
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import os
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import webdataset as wds
from tqdm import tqdm
from webdataset.tariterators import base_plus_ext

from clipit.data.base import DatasetError, ImageDataset, ImageDecodeError, decode_image
from clipit.errors import ClipitError, one_line
from clipit.io import atomic_path, atomic_write_json, atomic_write_text, read_json, sha256_file
from clipit.locks import exclusive

MANIFEST = "manifest.json"
PLAN = "build.json"
TEXTS = "texts.jsonl"  # the paired texts in report_index order: what a trainable text tower encodes
VERIFIED = ".manifest.verified.json"  # verify_shard_set's cache: stat + sha256 of tars it hashed
LOCKS = ".locks"  # one lock folder per shard being written (clipit.locks)
FORMAT = "clipit-shards/1"
IMAGE_FIELDS = ("png", "jpg", "jpeg", "tif", "tiff")  # the field names an image may be stored under
# Fixed tar header fields: webdataset's TarWriter stamps time.time() unless told otherwise.
TAR_MTIME = 0
TAR_OWNER = "clipit"
TAR_MODE = 0o444
# Plan keys that must agree between parts, reruns and the manifest.
PLAN_KEYS = ("format", "dataset", "classes", "samples_per_shard", "counts", "embedding", "texts", "selection")
SHARD_LOCK_WAIT_S = 3600.0  # a shard another process is writing: wait for it (one shard takes seconds to minutes)
# The fix of a bad shard. A rerun rebuilds exactly the missing shards (byte-identical) and writes the manifest again.
REBUILD = "delete this shard and rerun `clipit shard build --config <config>` (it rebuilds the missing shards)"


class ShardError(ClipitError):
    """Shards on disk disagree with their manifest or inputs (one line, names the file and the fix)."""


def encode_embedding(vector: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(vector, dtype=np.float16))
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
    return np.load(io.BytesIO(data))


def shard_path(out_dir: str | Path, split: str, index: int) -> Path:
    return Path(out_dir) / split / f"{split}-{index:06d}.tar"


def sample_key(split: str, index: int) -> str:
    return f"{split}_{index:08d}"  # dot-free and unique across splits


def num_shards(n_samples: int, samples_per_shard: int) -> int:
    return max(1, -(-n_samples // samples_per_shard))


def shard_count(n_samples: int, samples_per_shard: int, index: int) -> int:
    """How many samples shard `index` of a split of `n_samples` holds."""
    return min(n_samples, (index + 1) * samples_per_shard) - index * samples_per_shard


# ---------------------------------------------------------------------------------------- one shard


def check_image(data: bytes) -> None:
    """Fully decode encoded image bytes with the conversion the loader uses (raises ImageDecodeError)."""
    decode_image(data)


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
    """Temporary files a killed writer of `path` left behind (atomic_path names them .<name>.*.tmp).
    Only safe under the lock of whoever writes `path`: a live writer's temporary file looks the same."""
    if path.parent.is_dir():
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            stale.unlink(missing_ok=True)


def shard_lock(out_dir: str | Path, split: str, index: int, wait_s: float = SHARD_LOCK_WAIT_S):
    """The lock of one shard's writer: another process writing the same shard is waited for."""
    name = shard_path(out_dir, split, index).name
    return exclusive(Path(out_dir) / LOCKS / name.removesuffix(".tar"), f"shard {name}", wait_s=wait_s, poll_s=0.2)


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
    def select(cls, pairs: dict[str, np.ndarray], split: str, text_embeddings: np.ndarray, report_ids: list,
               use_rank: int = 1, random_seed: int | None = None) -> "SplitTexts":
        chosen, scores = select_texts(pairs, split, use_rank, random_seed, len(report_ids))
        return cls(split, chosen, scores, None if random_seed is not None else use_rank, pairs["indices"],
                   text_embeddings, report_ids)

    def fields(self, index: int, source_key: str, label: int) -> dict:
        """Every field of sample `index` except the image (`__key__`, `cls`, `emb.npy`, `json`)."""
        text_index, score = int(self.chosen[index]), float(self.scores[index])
        meta = {
            "report_id": self.report_ids[text_index],
            "report_index": text_index,
            "score": None if np.isnan(score) else score,
            "rank": self.rank,  # None: a random text (the control), not a retrieved one
            "topk_report_indices": [int(i) for i in self.topk[index]],
            "split": self.split,
            "source_key": source_key,
        }
        return {
            "__key__": sample_key(self.split, index),
            "cls": str(label).encode(),
            "emb.npy": encode_embedding(self.text_embeddings[text_index]),
            "json": json.dumps(meta).encode(),
        }


def write_split_shards(dataset: ImageDataset, split: str, pairs: dict[str, np.ndarray], text_embeddings: np.ndarray,
                       report_ids: list[str], out_dir: str | Path, samples_per_shard: int = 1000,
                       only: Iterable[int] | None = None, use_rank: int = 1,
                       random_seed: int | None = None) -> list[Path]:
    """Write the shards of one split (or just the shard indices in `only`); returns the shards this call
    wrote. Shards that exist are skipped; a shard another process is writing is waited for, then skipped."""
    from clipit.pairing.engine import decode_error

    n = dataset.split_size(split)
    if len(pairs["indices"]) != n:
        raise ShardError(f"{split}: pairs cover {len(pairs['indices'])} images but the dataset has {n}; re-run pairing")
    texts = SplitTexts.select(pairs, split, text_embeddings, report_ids, use_rank, random_seed)
    written = []
    todo = list(range(num_shards(n, samples_per_shard)) if only is None else only)
    for shard in tqdm(todo, desc=f"shards {split}", unit="shard", leave=False):
        path = shard_path(out_dir, split, shard)
        if path.exists():
            continue

        def samples(shard=shard):
            for index in range(shard * samples_per_shard, min(n, (shard + 1) * samples_per_shard)):
                item = dataset.sample(split, index)
                try:
                    check_image(item.data)
                except ImageDecodeError as err:
                    raise decode_error(dataset, item, err) from None
                yield texts.fields(index, item.key, item.label) | {item.ext: item.data}

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
                   embedding_identity: dict, extra: dict | None = None, texts: dict[str, SplitTexts] | None = None,
                   written: Iterable[str | Path] = ()) -> Path:
    """Summarise finished shards; written last, so its presence means the shard set is complete.

    Never blesses unchecked bytes: a shard in `written` (written by this process, in this run) is hashed;
    every other one is read back once, sample by sample, before it is listed: the tar must be whole, the
    keys and counts those of its place in the set, every image must decode, and the labels, source keys,
    embeddings (exact fp16 bytes) and json equal what the dataset and `texts` (per split: the pairs'
    selection; without it the json is only checked for sanity) give. What is not compared is whether an
    image's bytes are the source's own: that would mean reading the whole dataset again. A shard that
    fails is refused with one line: delete it and rerun `clipit shard build`."""
    out_dir = Path(out_dir)
    written = {os.path.abspath(p) for p in written}
    extra = extra or {}
    checker = _SampleChecker(len(dataset.classes), int(embedding_dim), (extra.get("texts") or {}).get("count"),
                             extra.get("selection"))
    splits = {}
    for split in dataset.splits:
        n = dataset.split_size(split)
        labels = dataset.labels(split)
        keys: list | None = None
        shards = []
        for i in range(num_shards(n, samples_per_shard)):
            path = shard_path(out_dir, split, i)
            if not path.exists():
                raise ShardError(f"{path}: shard missing; finish the build (rerun `clipit shard build --config <config>`) "
                                 "before the manifest")
            count = shard_count(n, samples_per_shard, i)
            if os.path.abspath(path) in written:
                sha = sha256_file(path)
            else:
                keys = dataset.keys(split) if keys is None else keys
                sha, got, problem = scan_shard(path, _on_sample(checker, path, split, i, samples_per_shard, count,
                                                                _expectation(split, keys, labels, (texts or {}).get(split))))
                if problem is not None:
                    raise problem
                if got != count:
                    raise ShardError(f"{path}: {got} samples where this set's shard holds {count}; {REBUILD}")
            shards.append({"path": path.relative_to(out_dir).as_posix(), "count": count, "sha256": sha})
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
        **extra,
    }
    path = out_dir / MANIFEST
    atomic_write_json(path, manifest)
    return path


def _expectation(split: str, keys: list, labels: np.ndarray, texts: SplitTexts | None) -> Callable[[int], dict]:
    """What sample `index` of a split must hold apart from its image: every field exactly with the split's
    texts, else its key, label and source key."""
    def expect(index: int) -> dict:
        if texts is not None:
            return texts.fields(index, keys[index], int(labels[index]))
        return {"__key__": sample_key(split, index), "cls": str(int(labels[index])).encode(), "source_key": keys[index]}
    return expect


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
            diff = [k for k in PLAN_KEYS if old.get(k) != plan.get(k)]
        except (ValueError, OSError, AttributeError):
            raise ShardError(f"{path}: unreadable; delete it and rerun `clipit shard build --config <config>`") from None
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
    try:
        manifest = read_json(path)
    except (OSError, ValueError) as err:
        raise ShardError(f"{path}: unreadable ({one_line(err)}); {_MANIFEST_FIX}") from None
    if not isinstance(manifest, dict):
        raise ShardError(f"{path}: not a manifest (a JSON {type(manifest).__name__}); {_MANIFEST_FIX}")
    return manifest


_MANIFEST_FIX = ("delete it and rerun `clipit shard build --config <config>` (it reads back the shards and writes the "
                 "manifest again)")


def split_urls(shard_dir: str | Path, split: str, manifest: dict | None = None) -> list[str]:
    manifest = manifest or load_manifest(shard_dir)
    if split not in manifest["splits"]:
        raise ShardError(f"{shard_dir}: no split {split!r} in the manifest (has {sorted(manifest['splits'])})")
    return [os.fspath(Path(shard_dir) / s["path"]) for s in manifest["splits"][split]["shards"]]


class _EndAwareTarInfo(tarfile.TarInfo):
    """tarfile ends its iteration quietly on a missing, cut or garbled header after the first member, so a
    truncated shard reads as a shorter one. This records why the iteration ended: only the archive's
    end-of-archive block (EOFHeaderError: a block of zeros) is a proper end."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as err:
            tar.clipit_end = err
            raise


class _Hashing:
    """A read-only file wrapper that hashes every byte read through it."""

    def __init__(self, fileobj, digest):
        self.fileobj, self.digest = fileobj, digest

    def read(self, size: int = -1) -> bytes:
        data = self.fileobj.read(size)
        self.digest.update(data)
        return data


def read_shard(url: str, fileobj=None) -> Iterator[dict]:
    """The samples of one shard in order, as webdataset groups them (`__key__`, `__url__`, one entry per
    field, lower-case), but strict: a tar that is cut short or garbled (also between members, where tarfile
    would just stop), a member that is no `<key>.<field>`, or a field twice in one sample raise ShardError
    naming the shard and the sample. Reads `fileobj` when given (sequentially), else opens `url`."""
    key, sample, member = None, None, None
    try:
        stream = fileobj if fileobj is not None else wds.gopen(url)
    except OSError as err:
        raise ShardError(f"{url}: cannot open the shard ({one_line(err)}); rerun `clipit shard build --config <config>` "
                         "(it rebuilds the missing shards)") from None
    try:
        try:
            with tarfile.open(fileobj=stream, mode="r|", tarinfo=_EndAwareTarInfo) as tar:
                for info in tar:
                    member = info.name
                    if not info.isreg() or member.startswith("__"):
                        continue  # directories, links, webdataset's __meta__ members: not sample fields
                    prefix, field = base_plus_ext(member)
                    if prefix is None:
                        raise ShardError(f"{url}: member {member!r} is not <key>.<field>; {REBUILD}")
                    data = tar.extractfile(info).read()
                    if sample is None or prefix != sample["__key__"]:
                        if sample is not None:
                            yield sample
                        key, sample = prefix, {"__key__": prefix, "__url__": url}
                    field = field.lower()
                    if field in sample:
                        raise ShardError(f"{url}: sample {prefix} holds two {field} members; {REBUILD}")
                    sample[field] = data
                end = getattr(tar, "clipit_end", None)
                if not isinstance(end, tarfile.EOFHeaderError):
                    raise tarfile.ReadError(f"cut short or garbled after member {member}"
                                            + (f": {one_line(str(end))}" if end is not None else ""))
        finally:
            if fileobj is None:
                stream.close()
    except ShardError:
        raise
    except (tarfile.TarError, OSError, EOFError, ValueError) as err:
        at = f"at sample {key}" if key else "before its first sample"
        raise ShardError(f"{url}: not a whole tar {at} ({one_line(str(err))}); the shard is truncated or "
                         f"corrupt: {REBUILD}") from None
    if sample is not None:
        yield sample


def tar_samples(src: Iterable[dict]) -> Iterator[dict]:
    """Pipeline stage: shard dicts ({"url": ...}, as webdataset's shard lists yield) -> samples, read
    strictly (`read_shard`); the stand-in for wds.tarfile_to_samples, whose default handler lets a
    tarfile/PIL exception out as a traceback and whose tar reader stops quietly at a cut."""
    for source in src:
        yield from read_shard(source["url"])


def iter_samples(urls: list[str]):
    """Raw samples in shard order (no shuffling, no splitting): for tests, validation, evaluation."""
    for url in urls:
        yield from read_shard(os.fspath(url))


def scan_shard(path: Path, on_sample: Callable[[dict, int], None]) -> tuple[str, int, ShardError | None]:
    """Read a shard once: (sha256 of all its bytes, samples read, the first problem or None). `on_sample`
    gets each sample and its position and raises ShardError for a bad one. After a problem the rest of
    the file is still hashed, so the caller can tell a shard that differs from its manifest (checksum)
    from one whose listed bytes are bad (a re-hashed manifest)."""
    digest = hashlib.sha256()
    count, problem = 0, None
    with open(path, "rb") as fh:
        reader = _Hashing(fh, digest)
        samples = read_shard(os.fspath(path), reader)
        try:
            for position, sample in enumerate(samples):
                on_sample(sample, position)
                count += 1
        except ShardError as err:
            problem = err
        finally:
            samples.close()
        while reader.read(1 << 20):
            pass
    return digest.hexdigest(), count, problem


class _SampleChecker:
    """The checks of one sample against its set (deep validation and the manifest's read-back)."""

    def __init__(self, n_classes: int, dim: int, num_texts: int | None = None, selection: dict | None = None):
        self.n_classes, self.dim, self.num_texts = n_classes, dim, num_texts
        mode = (selection or {}).get("mode")
        self.rank = (selection or {}).get("rank") if mode == "rank" else None
        self.check_rank = mode in ("rank", "random")
        self.seen: dict[str, str] = {}  # key -> shard it was first seen in
        self.labels: dict[str, dict[str, int]] = {}  # split -> label -> count

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
        try:
            decode_image(sample[images[0]])
        except ImageDecodeError as err:
            raise bad(f"its {images[0]} image does not decode ({err})") from None
        for field in ("cls", "emb.npy", "json"):
            if field not in sample:
                raise bad(f"no {field}")
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
        try:
            meta = json.loads(sample["json"])
        except (UnicodeDecodeError, ValueError) as err:
            raise bad(f"json does not parse ({one_line(err)})") from None
        problem = self._meta_problem(meta, split)
        if problem:
            raise bad(f"json {problem}")
        for field in ("cls", "emb.npy", "json"):
            if expect and field in expect and sample[field] != expect[field]:
                raise bad(f"its {field} differs from what the pairs and texts give (a shard of another build, or "
                          "corrupt)")
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
        missing = [k for k in ("report_id", "report_index", "score", "rank", "topk_report_indices", "split",
                               "source_key") if k not in meta]
        if missing:
            return f"lacks {', '.join(missing)}"
        if not text_index(meta["report_index"]):
            return f"report_index {meta['report_index']!r} is not a text of this set ({self.num_texts} texts)"
        if not isinstance(meta["report_id"], str):
            return f"report_id {meta['report_id']!r} is not a string"
        score = meta["score"]
        if score is not None and not (isinstance(score, (int, float)) and not isinstance(score, bool)
                                      and math.isfinite(score)):
            return f"score {score!r} is not a finite number"
        if self.check_rank and meta["rank"] != self.rank:
            return f"rank {meta['rank']!r} where the manifest's selection gives {self.rank!r}"
        if meta["rank"] is not None and not (integer(meta["rank"]) and meta["rank"] >= 1):
            return f"rank {meta['rank']!r} is not a rank"
        topk = meta["topk_report_indices"]
        if not (isinstance(topk, list) and topk and all(text_index(v) for v in topk)):
            return f"topk_report_indices {_short(topk, 40)} are not texts of this set"
        if meta["split"] != split:
            return f"split {meta['split']!r} in a shard of {split!r}"
        if not (isinstance(meta["source_key"], str) and meta["source_key"]):
            return f"source_key {meta['source_key']!r} is not a key"
        return None


def _on_sample(checker: _SampleChecker, path: Path, split: str, shard: int, per_shard: int, count: int,
               expect: Callable[[int], dict] | None = None) -> Callable[[dict, int], None]:
    """scan_shard's callback for shard `shard` of `split`: sample j is sample shard * per_shard + j of the split."""
    def on_sample(sample: dict, j: int) -> None:
        if j >= count:
            raise ShardError(f"{path}: more samples than the {count} this shard holds; {REBUILD}")
        index = shard * per_shard + j
        checker.check(sample, path, split, index, expect(index) if expect else None)
    return on_sample


def _check_manifest(shard_dir: str | Path, manifest: dict) -> None:
    """The manifest agrees with itself: format, shard list and counts follow from samples_per_shard and the
    split sizes, checksums look like sha256, class counts add up. Raises ShardError naming the manifest."""
    path = Path(shard_dir) / MANIFEST

    def bad(what: str) -> ShardError:
        return ShardError(f"{path}: {what}; {_MANIFEST_FIX}")

    try:
        if manifest.get("format") != FORMAT:
            raise bad(f"format {manifest.get('format')!r}, expected {FORMAT!r}")
        classes, per_shard, dim = manifest["classes"], manifest["samples_per_shard"], manifest["embedding"]["dim"]
        if not (isinstance(classes, list) and classes and isinstance(per_shard, int) and per_shard > 0
                and isinstance(dim, int) and dim > 0):
            raise bad("classes, samples_per_shard or embedding.dim is not what a shard build writes")
        counts, splits = manifest["counts"], manifest["splits"]
        if not isinstance(splits, dict) or set(counts) != set(splits):
            raise bad(f"counts cover {sorted(counts)} but splits cover {sorted(splits)}")
        for split, info in splits.items():
            n = info["count"]
            if not isinstance(n, int) or n < 0 or n != counts[split]:
                raise bad(f"split {split} counts {n!r} samples, counts says {counts[split]!r}")
            shards = info["shards"]
            if len(shards) != num_shards(n, per_shard):
                raise bad(f"split {split} lists {len(shards)} shards, {n} samples at {per_shard} per shard make "
                          f"{num_shards(n, per_shard)}")
            for i, shard in enumerate(shards):
                want = shard_path("", split, i).as_posix()
                if shard["path"] != want:
                    raise bad(f"split {split} shard {i} is {shard['path']!r}, expected {want!r}")
                if shard["count"] != shard_count(n, per_shard, i):
                    raise bad(f"{want} counts {shard['count']!r} samples, expected {shard_count(n, per_shard, i)}")
                sha = shard["sha256"]
                if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
                    raise bad(f"{want} has no sha256 ({_short(sha, 20)})")
            class_counts = info["class_counts"]
            if (not all(k.isdigit() and int(k) < len(classes) and isinstance(v, int) for k, v in class_counts.items())
                    or sum(class_counts.values()) != n):
                raise bad(f"split {split} class_counts {_short(class_counts, 60)} do not add up to {n} samples of "
                          f"{len(classes)} classes")
    except ShardError:
        raise
    except (KeyError, TypeError, AttributeError) as err:
        raise bad(f"malformed ({type(err).__name__}: {one_line(str(err))})") from None


def _missing(path: Path) -> ShardError:
    return ShardError(f"{path}: listed in the manifest but missing; rerun `clipit shard build --config <config>` "
                      "(it rebuilds the missing shards)")


def _checksum_error(path: Path) -> ShardError:
    return ShardError(f"{path}: checksum differs from the manifest; the shard is corrupt: {REBUILD}")


def validate_shards(shard_dir: str | Path, quick: bool = False) -> dict:
    """`clipit shard validate`: the manifest agrees with itself, every listed shard exists and has its sha256;
    then (unless `quick`) every sample is read: the tar is whole, keys are those of the sample's place in
    the set (so unique), the image decodes fully, the label is one of the manifest's classes, emb.npy is
    float16 of the manifest's dimension and finite, json parses and its fields are sane, and the counts
    (per shard and per class) are the manifest's. Returns the sample count per split."""
    shard_dir = Path(shard_dir)
    manifest = load_manifest(shard_dir)
    _check_manifest(shard_dir, manifest)
    per_shard = manifest["samples_per_shard"]
    checker = _SampleChecker(len(manifest["classes"]), manifest["embedding"]["dim"],
                             (manifest.get("texts") or {}).get("count"), manifest.get("selection"))
    summary = {}
    for split, info in manifest["splits"].items():
        for i, shard in enumerate(info["shards"]):
            path = shard_dir / shard["path"]
            if not path.is_file():
                raise _missing(path)
            if quick:
                sha, count, problem = sha256_file(path), shard["count"], None
            else:
                sha, count, problem = scan_shard(path, _on_sample(checker, path, split, i, per_shard, shard["count"]))
            if sha != shard["sha256"]:
                raise _checksum_error(path)
            if problem is not None:
                raise problem
            if count != shard["count"]:
                raise ShardError(f"{path}: {count} samples, the manifest says {shard['count']}; {REBUILD}")
        if not quick and checker.labels.get(split, {}) != info["class_counts"]:
            raise ShardError(f"{shard_dir / MANIFEST}: split {split} class_counts {_short(info['class_counts'], 60)} "
                             f"but the shards hold {_short(checker.labels.get(split, {}), 60)}; {_MANIFEST_FIX}")
        summary[split] = info["count"]
    return summary


def _stamp(st: os.stat_result, sha256: str) -> dict:
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "ino": st.st_ino,
            "sha256": sha256}


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
    _check_manifest(shard_dir, manifest)
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


__all__ = [
    "IMAGE_FIELDS", "MANIFEST", "PLAN", "REBUILD", "TEXTS", "ShardError", "DatasetError", "SplitTexts", "build_plan",
    "check_image", "check_plan", "decode_embedding", "encode_embedding", "iter_samples", "load_manifest",
    "load_texts", "missing_shards", "num_shards", "part_units", "read_shard", "sample_key", "scan_shard",
    "select_texts", "shard_lock", "shard_path", "shard_units", "split_urls", "tar_samples", "validate_shards",
    "verify_shard_set", "write_manifest", "write_split_shards", "write_tar", "write_texts",
]
