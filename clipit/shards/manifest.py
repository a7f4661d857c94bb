"""A shard set's names and its JSON files: where shard i of a split lives, the build plan, the manifest
and texts.jsonl.

Layout under the shard directory:
    <split>/<split>-<shard:06d>.tar   positions [i * samples_per_shard, (i + 1) * samples_per_shard) of the
                                      split's write order: the dataset order, or for a shuffled split (the
                                      train split) a seeded permutation of it (`order` below)
    build.json                        the build plan (dataset, counts, embedding, texts, selection, image codec), written first
    manifest.json                     the plan + shard list with sha256 and class counts, written last
    texts.jsonl                       the paired texts in report_index order
Every sample keeps its dataset index in its key (`<split>_<index:08d>`), whatever shard holds it. The
plan's `order` records how each shuffled split (train) was permuted (clipit/shards/order.py); training
refuses a set without it (order.require_shuffled_train): shards written in dataset order are class-sorted
for most datasets, so an epoch's batches would hold few classes.
A rerun with another plan stops with one line naming the changed config keys instead of mixing two builds
(`check_plan`); `clipit shard build --overwrite` replaces the set.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from clipit.data.base import ImageDataset
from clipit.errors import ClipitError, one_line
from clipit.identity import OVERWRITE, changed_output, identity_changes
from clipit.io import atomic_write_text, read_json
from clipit.shards.codec import image_spec, spec_problem

MANIFEST = "manifest.json"
PLAN = "build.json"
TEXTS = "texts.jsonl"  # the paired texts in report_index order: what a trainable text tower encodes
VERIFIED = ".manifest.verified.json"  # verify_shard_set's cache: stat + sha256 of tars it hashed
LOCKS = ".locks"  # one lock folder per shard being written (clipit.locks)
FORMAT = "clipit-shards/1"
# Plan keys that must agree between parts, reruns and the manifest.
PLAN_KEYS = (
    "format",
    "dataset",
    "classes",
    "samples_per_shard",
    "counts",
    "embedding",
    "texts",
    "selection",
    "image",
    "order",
)
PAIRS = "pairs"  # the pairs' identity: compared when the set on disk records it (sets built before did not)
REBUILD_SET = f"rebuild the set: rerun `clipit shard build --config <config>` with `{OVERWRITE}`"
# The fix of a bad shard. A rerun rebuilds exactly the missing shards (byte-identical) and writes the manifest again.
REBUILD = "delete this shard and rerun `clipit shard build --config <config>` (it rebuilds the missing shards)"
MANIFEST_FIX = (
    "delete it and rerun `clipit shard build --config <config>` (it reads back the shards and writes the "
    "manifest again)"
)


class ShardError(ClipitError):
    """Shards on disk disagree with their manifest or inputs (one line, names the file and the fix)."""


def shard_path(out_dir: str | Path, split: str, index: int) -> Path:
    return Path(out_dir) / split / f"{split}-{index:06d}.tar"


def sample_key(split: str, index: int) -> str:
    return f"{split}_{index:08d}"  # dot-free and unique across splits


def num_shards(n_samples: int, samples_per_shard: int) -> int:
    return max(1, -(-n_samples // samples_per_shard))


def shard_count(n_samples: int, samples_per_shard: int, index: int) -> int:
    """How many samples shard `index` of a split of `n_samples` holds."""
    return min(n_samples, (index + 1) * samples_per_shard) - index * samples_per_shard


def sample_index(key: str) -> int:
    """The dataset index in a sample key (`sample_key`'s inverse)."""
    try:
        return int(str(key).rsplit("_", 1)[1])
    except (IndexError, ValueError):
        raise ShardError(f"sample key {key!r} is not <split>_<index> (a shard of another build); {REBUILD}") from None


def split_counts(manifest: dict, split: str) -> list[int]:
    """Samples per shard of `split`, in shard order."""
    return [int(s["count"]) for s in manifest["splits"][split]["shards"]]


def short(value, limit: int = 80) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------------------------------------- plan


def build_plan(
    dataset: ImageDataset,
    samples_per_shard: int,
    embedding_dim: int,
    embedding_identity: dict,
    texts: dict,
    selection: dict,
    image: dict,
    order: dict,
    pairs: dict | None = None,
) -> dict:
    """`order`: order.plan_order of the split sizes (which splits are shuffled, how); `pairs`: the identity
    the pairs were made under (pairing/engine.py::pairing_identity)."""
    counts = {split: dataset.split_size(split) for split in dataset.splits}
    return json.loads(
        json.dumps(
            {
                "format": FORMAT,
                "dataset": dataset.name,
                "classes": list(dataset.classes),
                "samples_per_shard": int(samples_per_shard),
                "counts": counts,
                "embedding": {"dim": int(embedding_dim), "dtype": "float16", "model": embedding_identity},
                "texts": texts,
                "selection": selection,
                "image": image,
                "order": order,
                **({"pairs": pairs} if pairs is not None else {}),
            }
        )
    )


def config_view(plan: dict) -> dict:
    """A plan keyed as the config spells what made it, so that a changed plan names config keys: the
    shards.* settings, the dataset (data.*), the paired texts and the model of their embeddings (pairing.*)."""
    selection = plan.get("selection") or {}
    chosen = (
        {"random_report_seed": selection.get("seed")}
        if selection.get("mode") == "random"
        else {"use_rank": selection.get("rank")}
    )
    texts = plan.get("texts") or {}
    return {
        "format": plan.get("format"),
        "shards": {"samples_per_shard": plan.get("samples_per_shard"), "codec": image_spec(plan), **chosen},
        "data": {"name": plan.get("dataset"), "classes": plan.get("classes"), "sizes": plan.get("counts")},
        "pairing": {"texts": texts.get("kind"), "embedding": plan.get("embedding")},
        "texts": {k: v for k, v in texts.items() if k != "kind"},
        **({"paired_under": plan[PAIRS]} if PAIRS in plan else {}),
    }


def _plan_value(plan: dict, key: str):
    return image_spec(plan) if key == "image" else plan.get(key)


def check_plan(out_dir: Path, plan: dict) -> bool:
    """True when a manifest for exactly this plan exists; raises when shards of another plan are there."""
    for name in (MANIFEST, PLAN):
        path = out_dir / name
        if not path.exists():
            continue
        try:
            old = read_json(path)
            keys = PLAN_KEYS + ((PAIRS,) if PAIRS in old else ())
            diff = [k for k in keys if _plan_value(old, k) != _plan_value(plan, k)]
        except (ValueError, OSError, AttributeError):
            raise ShardError(
                f"{path}: unreadable; delete it and rerun `clipit shard build --config <config>`"
            ) from None
        if diff:
            codec = f" or set shards.codec: {image_spec(old).get('codec')}" if "image" in diff else ""
            in_dataset_order = "order" in diff and not old.get("order")  # built before training splits were shuffled
            raise changed_output(
                path,
                f"the shards in {out_dir} were built",
                identity_changes(config_view(old), config_view(plan))
                or ("the train split written in dataset order then, shuffled now" if in_dataset_order else "")
                or f"{diff[0]} differs",
                f"set shards.dir to a new folder{codec}",
                f"rerun `clipit shard build --config <config>` with `{OVERWRITE}`",
            )
        if name == MANIFEST:
            return True
    return False


def existing_codec(out_dir: Path) -> str | None:
    """The image codec of the set (plan or manifest) already in `out_dir`, None when there is none (an
    unreadable file is check_plan's to report)."""
    for name in (MANIFEST, PLAN):
        try:
            return image_spec(read_json(Path(out_dir) / name)).get("codec")
        except (OSError, ValueError, AttributeError):
            continue
    return None


# --------------------------------------------------------------------------------- manifest, texts


def load_manifest(shard_dir: str | Path) -> dict:
    path = Path(shard_dir) / MANIFEST
    if not path.exists():
        raise ShardError(f"{path}: no manifest; build the shards first (`clipit shard build` or `clipit demo`)")
    try:
        manifest = read_json(path)
    except (OSError, ValueError) as err:
        raise ShardError(f"{path}: unreadable ({one_line(err)}); {MANIFEST_FIX}") from None
    if not isinstance(manifest, dict):
        raise ShardError(f"{path}: not a manifest (a JSON {type(manifest).__name__}); {MANIFEST_FIX}")
    return manifest


def check_manifest(shard_dir: str | Path, manifest: dict) -> None:
    """The manifest agrees with itself: format, image codec, shard list and counts follow from samples_per_shard
    and the split sizes, checksums look like sha256, class counts add up. Raises ShardError naming the manifest."""
    path = Path(shard_dir) / MANIFEST

    def bad(what: str) -> ShardError:
        return ShardError(f"{path}: {what}; {MANIFEST_FIX}")

    try:
        if manifest.get("format") != FORMAT:
            raise bad(f"format {manifest.get('format')!r}, expected {FORMAT!r}")
        problem = spec_problem(image_spec(manifest))
        if problem:
            raise bad(problem)
        classes, per_shard, dim = manifest["classes"], manifest["samples_per_shard"], manifest["embedding"]["dim"]
        if not (
            isinstance(classes, list)
            and classes
            and isinstance(per_shard, int)
            and per_shard > 0
            and isinstance(dim, int)
            and dim > 0
        ):
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
                raise bad(
                    f"split {split} lists {len(shards)} shards, {n} samples at {per_shard} per shard make "
                    f"{num_shards(n, per_shard)}"
                )
            for i, shard in enumerate(shards):
                want = shard_path("", split, i).as_posix()
                if shard["path"] != want:
                    raise bad(f"split {split} shard {i} is {shard['path']!r}, expected {want!r}")
                if shard["count"] != shard_count(n, per_shard, i):
                    raise bad(f"{want} counts {shard['count']!r} samples, expected {shard_count(n, per_shard, i)}")
                sha = shard["sha256"]
                if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
                    raise bad(f"{want} has no sha256 ({short(sha, 20)})")
            record = (manifest.get("order") or {}).get(split)
            if record is not None and (not isinstance(record, dict) or record.get("count") != n):
                raise bad(f"order of split {split} is {short(record, 40)}, not a permutation of its {n} samples")
            class_counts = info["class_counts"]
            if (
                not all(k.isdigit() and int(k) < len(classes) and isinstance(v, int) for k, v in class_counts.items())
                or sum(class_counts.values()) != n
            ):
                raise bad(
                    f"split {split} class_counts {short(class_counts, 60)} do not add up to {n} samples of "
                    f"{len(classes)} classes"
                )
    except ShardError:
        raise
    except (KeyError, TypeError, AttributeError) as err:
        raise bad(f"malformed ({type(err).__name__}: {one_line(str(err))})") from None


def split_urls(shard_dir: str | Path, split: str, manifest: dict | None = None) -> list[str]:
    manifest = manifest or load_manifest(shard_dir)
    if split not in manifest["splits"]:
        raise ShardError(f"{shard_dir}: no split {split!r} in the manifest (has {sorted(manifest['splits'])})")
    return [os.fspath(Path(shard_dir) / s["path"]) for s in manifest["splits"][split]["shards"]]


def write_texts(out_dir: Path, texts: list) -> None:
    lines = [json.dumps({"id": t.id, "text": t.text}, ensure_ascii=False) + "\n" for t in texts]
    atomic_write_text(Path(out_dir) / TEXTS, "".join(lines))


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
