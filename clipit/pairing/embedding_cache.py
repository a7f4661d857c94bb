"""The text-embedding cache of a pairing directory: embeddings.npy [M, D], ids.json and identity.json
(pairing-model identity, corpus fingerprint, dims). identity.json is written last and marks the cache
complete; a cache made by another model or for another corpus reads as absent, so it is recomputed."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from clipit.corpus import CorpusError, Report, corpus_fingerprint
from clipit.io import atomic_save_npy, atomic_write_json, read_json_object

log = logging.getLogger(__name__)


_CACHE_VERSION = 1


def _jsonable(obj: Any, where: Path) -> Any:
    try:
        return json.loads(json.dumps(obj, sort_keys=True))  # tuples -> lists, so saved and expected compare equal
    except TypeError as e:
        raise CorpusError(f"{where}: model identity must be JSON-serialisable ({e}); use plain values") from None


def save_text_embeddings(
    path_dir: str | os.PathLike, embeddings: np.ndarray, reports: list[Report], model_identity: dict
) -> dict:
    """Write embeddings.npy, ids.json, then identity.json last: identity.json is the commit marker,
    removed first so that an interrupted rewrite reads as "absent" (recompute), never as valid."""
    d = Path(path_dir)
    emb = np.asarray(embeddings)
    if emb.ndim != 2 or emb.shape[0] != len(reports):
        raise CorpusError(
            f"{d}: embeddings of shape {emb.shape} do not match {len(reports)} reports; pass one row per report"
        )
    if emb.dtype not in (np.float16, np.float32):
        raise CorpusError(f"{d}: embeddings dtype {emb.dtype} not supported; cast to float32 or float16")
    if not np.isfinite(emb).all():
        raise CorpusError(f"{d}: embeddings contain NaN/inf; check the text encoder (fp16 overflow?)")
    identity = {
        "version": _CACHE_VERSION,
        "model": _jsonable(model_identity, d),
        "fingerprint": corpus_fingerprint(reports),
        "count": int(emb.shape[0]),
        "dim": int(emb.shape[1]),
        "dtype": str(emb.dtype),
    }
    d.mkdir(parents=True, exist_ok=True)
    (d / "identity.json").unlink(missing_ok=True)
    atomic_save_npy(d / "embeddings.npy", emb)
    atomic_write_json(d / "ids.json", [r.id for r in reports], indent=None)
    atomic_write_json(d / "identity.json", identity, indent=1)
    return identity


def load_text_embeddings(
    path_dir: str | os.PathLike, expect_identity: dict | None = None, expect_fingerprint: str | None = None
) -> tuple[np.ndarray, list[str]] | None:
    """(embeddings M x D, ids) from a cache; None when absent or stale (other model/corpus/version)."""
    d = Path(path_dir)
    marker = d / "identity.json"
    if not marker.is_file():
        return None
    fix = f"delete {d} to recompute"
    ident = read_json_object(marker, fix, error=lambda path, why: CorpusError(f"{path}: corrupt cache marker: {why}"))
    if ident.get("version") != _CACHE_VERSION:
        log.info("%s: cache version differs, recomputing", d)
        return None
    if expect_identity is not None and ident.get("model") != _jsonable(expect_identity, d):
        log.info("%s: cache made by another model, recomputing", d)
        return None
    if expect_fingerprint is not None and ident.get("fingerprint") != expect_fingerprint:
        log.info("%s: cache made for another corpus, recomputing", d)
        return None
    try:
        emb = np.load(d / "embeddings.npy")
        ids = json.loads((d / "ids.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, EOFError) as e:
        raise CorpusError(f"{d}: corrupt text-embedding cache ({e}); {fix}") from None
    if emb.ndim != 2 or not isinstance(ids, list) or len(ids) != emb.shape[0]:
        raise CorpusError(f"{d}: corrupt cache: embeddings {emb.shape} vs {len(ids)} ids; {fix}")
    if (emb.shape[0], emb.shape[1], str(emb.dtype)) != (ident.get("count"), ident.get("dim"), ident.get("dtype")):
        raise CorpusError(f"{d}: corrupt cache: embeddings {emb.shape} {emb.dtype} disagree with identity.json; {fix}")
    return emb, ids
