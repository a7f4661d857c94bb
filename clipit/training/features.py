"""The frozen-backbone feature cache: every image of the train and val splits through the backbone once,
shared by every seed and method that trains only what comes after a frozen backbone on unaugmented
images (the unimodal probe, frozen baselines, the no-LoRA ablation). This module decides who uses it,
which cache a run needs and builds it; its files, their checks and loading: clipit/training/feature_files.py.

Which models can use it (the hook): a model with a `backbone` module whose parameters are all frozen,
`features(images) -> [B, D]` and `from_features(feats, text_emb) -> outputs`, such that
`forward(images, text_emb) == from_features(features(images), text_emb)` (models/clipit.py,
models/baselines.py). Which runs use it: `methods.<m>.feature_cache: true` (the default) with
finetune resolving to frozen, augment false and cached report embeddings (`uses_feature_cache`).

One cache per key, `<shards.dir>/features/<key>/` (clipit/layout.py). The key hashes `cache_identity`:
the backbone's name, weights setting and the sha256 of its actual tensors (which covers a weights file,
a hub download, a random init and a warm start alike), the preprocessing (input size, mean, std), the
precision it runs at, and the shard set's checksums. A build holds the cache directory's lock (rank 0
for a multi-process launch; another job waits for it, then reuses the cache); ranks encode disjoint
shards, rank 0 writes the manifest. A killed build resumes at the first missing shard file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from pathlib import Path

import torch

from clipit import layout
from clipit.config import ExperimentConfig, TrainConfig
from clipit.errors import ClipitError
from clipit.io import read_json
from clipit.locks import LockHeld, exclusive
from clipit.methods import method_spec
from clipit.models.clipit import BACKBONE_FORWARDS
from clipit.training.accel import any_rank, raise_together
from clipit.training.feature_files import (
    FORMAT,
    MANIFEST,
    SPLITS,
    FeatureCacheError,
    check_cache_identity,
    verify_cache,
    write_manifest,
    write_part,
)
from clipit.training.loader import eval_loader
from clipit.training.predict import ShardSource

WAIT_S = 12 * 3600  # how long a launch waits for another job that builds the same cache
POLL_S = 5.0


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
                        write_manifest(cache_dir, identity, manifest)
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
                write_part(cache_dir, split, index_of[url], url, pending.pop(url))
    missing = sorted(
        set(expected) - {u for u in expected if layout.feature_part(cache_dir, split, index_of[u]).exists()}
    )
    if missing:
        raise FeatureCacheError(
            f"{missing[0]}: gave fewer samples than its manifest lists while building the feature "
            f"cache; check the shards with `clipit shard validate {shard_dir}`"
        )
