"""The frozen-backbone feature cache: every image of the train and val splits through the backbone once,
shared by every seed and method that trains only what comes after a frozen backbone on unaugmented
images (the unimodal probe, frozen baselines, the no-LoRA ablation).

Which models can use it (the hook): a model with a `backbone` module whose parameters are all frozen,
`features(images) -> [B, D]` and `from_features(feats, text_emb) -> outputs`, such that
`forward(images, text_emb) == from_features(features(images), text_emb)` (models/clipit.py,
models/baselines.py). Which runs use it: `methods.<m>.feature_cache: true` (the default) with
finetune resolving to frozen, augment false and cached report embeddings (`uses_feature_cache`).

One cache per key, `<shards.dir>/features/<key>/` (clipit/layout.py). The key hashes `cache_identity`:
the backbone's name, weights setting and the sha256 of its actual tensors (which covers a weights file,
a hub download, a random init and a warm start alike), the preprocessing (input size, mean, std), the
precision it runs at, and the shard set's checksums. Files:
    <split>/<split>-NNNNNN.safetensors   shard NNNNNN's samples in tar order: features [n, D] (the
                                          backbone's output dtype), labels int64 [n], text_emb fp16 [n, T];
                                          the sample keys in the header's metadata
    manifest.json                         identity, per split the count, dim, dtype and every file's
                                          count and sha256; written last: its presence marks the cache complete
Every file is written atomically. A build holds the cache directory's lock (rank 0 for a multi-process
launch; another job waits for it, then reuses the cache); ranks encode disjoint shards, rank 0 writes the
manifest. A killed build resumes at the first missing shard file. Each use checks every file against
the manifest (sha256, dtype, shape, count) and its recorded identity against the requested one (a reused
cache is exactly the one asked for); anything else is one FeatureCacheError line naming the file and the fix.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from clipit import layout
from clipit.config import ExperimentConfig, TrainConfig
from clipit.errors import ClipitError, one_line
from clipit.identity import identity_changes
from clipit.io import atomic_path, atomic_write_json, read_json, sha256_file
from clipit.locks import LockHeld, exclusive
from clipit.methods import method_spec
from clipit.models.clipit import BACKBONE_FORWARDS
from clipit.training.accel import any_rank, raise_together
from clipit.training.loader import eval_loader
from clipit.training.predict import ShardSource

FORMAT = 1
SPLITS = ("train", "val")  # what training reads; test evaluation runs the model as exported
MANIFEST = "manifest.json"
WAIT_S = 12 * 3600  # how long a launch waits for another job that builds the same cache
POLL_S = 5.0


class FeatureCacheError(ClipitError):
    """A feature cache on disk is damaged or does not match its manifest."""


def uses_feature_cache(cfg: ExperimentConfig, method: str, model: torch.nn.Module | None = None) -> bool:
    """Whether `method` trains on cached features: feature_cache true, a frozen backbone, unaugmented
    images, cached report embeddings, and (given `model`) a model that implements the hook."""
    tcfg = cfg.methods[method]
    spec = method_spec(tcfg.method)
    if (
        not tcfg.feature_cache
        or spec.vision is None
        or tcfg.augment
        or tcfg.text_encoder == "tower"
        or spec.finetune(tcfg.finetune, cfg.model.lora.enabled) != "frozen"
    ):
        return False
    if model is None:
        return True
    backbone = getattr(model, "backbone", None)
    return (
        callable(getattr(model, "from_features", None))
        and isinstance(backbone, torch.nn.Module)
        and not any(p.requires_grad for p in backbone.parameters())
    )


def backbone_forwards_so_far() -> int:
    """Images run through any backbone in this process (cache builds and online steps)."""
    return BACKBONE_FORWARDS["images"]


def tensors_sha256(module: torch.nn.Module) -> str:
    """sha256 of a module's state (names, dtypes, shapes and bytes, in name order)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cache_identity(
    cfg: ExperimentConfig, tcfg: TrainConfig, model: torch.nn.Module, preprocess, manifest: dict
) -> dict:
    """What the cached features depend on (no seed, no method: those share a cache when these agree)."""
    shards = {split: [s["sha256"] for s in manifest["splits"][split]["shards"]] for split in SPLITS}
    return {
        "format": FORMAT,
        "splits": list(SPLITS),
        "backbone": {
            "name": cfg.model.backbone,
            "class": type(model.backbone).__name__,
            "weights": cfg.model.weights,
            **({"timm_kwargs": cfg.model.timm_kwargs} if cfg.model.timm_kwargs else {}),  # e.g. global_pool
            "tensors_sha256": tensors_sha256(model.backbone),
        },
        "preprocess": {
            "size": int(preprocess.size),
            "mean": [round(float(v), 8) for v in preprocess.mean.flatten()],
            "std": [round(float(v), 8) for v in preprocess.std.flatten()],
        },
        "precision": tcfg.precision,
        "shards_sha256": hashlib.sha256(json.dumps(shards, sort_keys=True).encode()).hexdigest(),
    }


def cache_key(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


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


def ensure_cache(
    accelerator, cfg: ExperimentConfig, tcfg: TrainConfig, model, preprocess, manifest: dict, log=print
) -> tuple[Path, dict, int]:
    """(cache dir, its manifest, backbone forwards this call ran): built if missing, checked if present."""
    identity = cache_identity(cfg, tcfg, model, preprocess, manifest)
    cache_dir = layout.feature_cache_dir(cfg.shards.dir, cache_key(identity))
    main = accelerator.is_main_process
    before = backbone_forwards_so_far()
    if _rank0(accelerator, main and not (cache_dir / MANIFEST).exists()):
        with _build_lock(accelerator, cache_dir, log):
            if _rank0(accelerator, main and not (cache_dir / MANIFEST).exists()):  # another job may have built it
                if main:
                    log(f"[clipit train] feature cache: encoding train and val once into {cache_dir}", flush=True)
                _encode_missing(accelerator, cache_dir, Path(cfg.shards.dir), tcfg, model, preprocess, manifest)
                accelerator.wait_for_everyone()
                error = None
                if main:
                    try:
                        _write_manifest(cache_dir, identity, manifest)
                    except ClipitError as err:
                        error = err
                raise_together(
                    accelerator,
                    error,
                    FeatureCacheError(f"{cache_dir}: rank 0 could not finish the feature cache (see its error line)"),
                )
    error, cache_manifest = None, None
    if main:
        try:
            cache_manifest = verify_cache(cache_dir)
            check_cache_identity(cache_dir, cache_manifest, identity)
        except ClipitError as err:
            error = err
    raise_together(
        accelerator,
        error,
        FeatureCacheError(f"{cache_dir}: rank 0 found the feature cache damaged (see its error line)"),
    )
    if not main:
        cache_manifest = read_json(cache_dir / MANIFEST)
    return cache_dir, cache_manifest, backbone_forwards_so_far() - before


def _rank0(accelerator, flag: bool) -> bool:
    """Rank 0's `flag` on every rank (the others pass False), so all ranks take the same branch."""
    return any_rank(accelerator.device, flag)[0] if accelerator.num_processes > 1 else bool(flag)


@contextlib.contextmanager
def _build_lock(accelerator, cache_dir: Path, log):
    """Rank 0 holds the cache directory's lock; while another job holds it, every rank waits (polling
    together, so no rank sits in a long collective)."""
    with contextlib.ExitStack() as held:
        deadline, told = time.monotonic() + WAIT_S, False
        while True:
            error = None
            if accelerator.is_main_process:
                try:
                    held.enter_context(exclusive(cache_dir, "feature cache"))
                except LockHeld as err:
                    error = err
                except ClipitError as err:  # a file system that cannot lock: waiting does not help
                    raise_together(accelerator, err, err)
            if not _rank0(accelerator, error is not None):
                break
            if time.monotonic() > deadline:
                raise_together(accelerator, error, FeatureCacheError(f"{cache_dir}: still locked after {WAIT_S} s"))
            if error is not None and not told:
                log(f"[clipit train] {error}; waiting for it to finish the feature cache", flush=True)
                told = True
            time.sleep(POLL_S)
        yield


@torch.no_grad()
def _encode_missing(
    accelerator, cache_dir: Path, shard_dir: Path, tcfg: TrainConfig, model, preprocess, manifest: dict
) -> None:
    """This rank's share of the missing shard files: unit j (over every split's shards) goes to rank j % world."""
    units = [(split, i) for split in SPLITS for i in range(len(manifest["splits"][split]["shards"]))]
    mine = [
        u
        for j, u in enumerate(units)
        if j % accelerator.num_processes == accelerator.process_index
        and not layout.feature_part(cache_dir, *u).exists()
    ]
    was_training = model.training
    model.eval()  # features as validation sees them (the registered backbones have no dropout or batch norm)
    model.to(accelerator.device)
    preprocess = preprocess.to(accelerator.device)
    for split in SPLITS:
        indices = [i for s, i in mine if s == split]
        if indices:
            _encode_shards(accelerator, cache_dir, shard_dir, split, indices, tcfg, model, preprocess, manifest)
    model.train(was_training)


def _encode_shards(
    accelerator,
    cache_dir: Path,
    shard_dir: Path,
    split: str,
    indices: list[int],
    tcfg: TrainConfig,
    model,
    preprocess,
    manifest: dict,
) -> None:
    source = ShardSource(shard_dir, split, manifest)
    urls = source.urls
    index_of = {urls[i]: i for i in indices}
    expected = {urls[i]: manifest["splits"][split]["shards"][i]["count"] for i in indices}
    pending: dict[str, list] = {}
    loader = eval_loader(
        [urls[i] for i in indices],
        2 * tcfg.batch_size,
        num_workers=tcfg.num_workers,
        load_size=preprocess.size,
        with_urls=True,
        image=manifest.get("image"),
    )
    for batch in source.batches(loader, f"the feature cache build of {cache_dir}"):
        with accelerator.autocast():
            feats = model.features(preprocess(batch["images"].to(accelerator.device)))
        feats = feats.detach().cpu()
        for url in dict.fromkeys(batch["urls"]):
            rows = [r for r, u in enumerate(batch["urls"]) if u == url]
            part = pending.setdefault(url, [])
            part.append((feats[rows], batch["labels"][rows], batch["text_emb"][rows], [batch["keys"][r] for r in rows]))
            if sum(len(p[3]) for p in part) == expected[url]:
                _write_part(cache_dir, split, index_of[url], url, pending.pop(url))
    missing = sorted(
        set(expected) - {u for u in expected if layout.feature_part(cache_dir, split, index_of[u]).exists()}
    )
    if missing:
        raise FeatureCacheError(
            f"{missing[0]}: gave fewer samples than its manifest lists while building the feature "
            f"cache; check the shards with `clipit shard validate {shard_dir}`"
        )


def _write_part(cache_dir: Path, split: str, index: int, url: str, parts: list) -> None:
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


def _write_manifest(cache_dir: Path, identity: dict, manifest: dict) -> None:
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
