"""The pairing stage: text embeddings (cached), image embeddings (batched), top-k pairs per split.

Outputs, per split, `<pairing.dir>/pairs-<split>.npz` with `indices` [N, k], `scores` [N, k], the
dataset `keys` and `labels`, and `meta` (JSON: the model identity, the text corpus fingerprint, k and
the config spec and identity that made it), written atomically. A rerun skips a split whose file exists
*and* whose meta matches. A file made under another config (`pairing_identity`: another model, corpus,
top_k or dataset) stops the stage with one line naming the changed keys (clipit/identity.py), unless
`--overwrite` asks to recompute it: an ablation never reuses stale pairs, nor silently replaces them.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from clipit.config import ConfigError
from clipit.corpus import Report, corpus_fingerprint
from clipit.data.base import DatasetError, ImageDataset, ImageDecodeError, ImageSample, decode_image, worker_error
from clipit.errors import one_line
from clipit.identity import OVERWRITE, changed_output, identity_changes
from clipit.io import atomic_save_npz, atomic_write_json
from clipit.pairing.embedding_cache import load_text_embeddings, save_text_embeddings
from clipit.pairing.encoders import PairingModel
from clipit.pairing.search import topk_cosine
from clipit.progress import progress

log = logging.getLogger(__name__)


def sample_location(dataset: ImageDataset, item: ImageSample) -> str:
    """Best-effort path of a sample's file (for error messages): <root>/<key>.<ext> when it exists."""
    for base in (getattr(dataset, "photos", None), getattr(dataset, "root", None)):
        if base is None:
            continue
        base = Path(base)
        candidate = base / f"{item.key}.{item.ext}"
        if not candidate.is_file():  # other suffix spellings: .jpeg, .tiff, .PNG
            candidate = next(iter(sorted(candidate.parent.glob(f"{glob.escape(candidate.stem)}.*"))), candidate)
        if candidate.is_file():
            return str(candidate)
    return f"{dataset.name}:{item.key}"


def decode_error(dataset: ImageDataset, item: ImageSample, err: BaseException) -> DatasetError:
    """One line for a source image that does not decode (decode_image's ImageDecodeError carries the reason)."""
    reason = str(err) if isinstance(err, ImageDecodeError) else one_line(err)
    return DatasetError(
        f"{sample_location(dataset, item)}: cannot decode image ({reason}); replace or delete the file and rerun"
    )


class _Preprocessed(Dataset):
    """Decode + the pairing model's own preprocessing, run in DataLoader workers."""

    def __init__(self, dataset: ImageDataset, split: str, preprocess):
        self.dataset, self.split, self.preprocess = dataset, split, preprocess

    def __len__(self):
        return self.dataset.split_size(self.split)

    def __getitem__(self, index):
        item = self.dataset.sample(self.split, index)
        try:
            image = decode_image(item.data)
        except Exception as err:  # PIL raises several types for undecodable bytes
            raise decode_error(self.dataset, item, err) from None
        return self.preprocess(image)


def embed_reports(
    model: PairingModel, reports: list[Report], cache_dir: str | Path, batch_size: int = 256
) -> np.ndarray:
    """Text embeddings of the corpus, computed once per (model identity, corpus) and cached."""
    fingerprint = corpus_fingerprint(reports)
    cached = load_text_embeddings(cache_dir, expect_identity=model.identity, expect_fingerprint=fingerprint)
    if cached is not None:
        return cached[0]
    chunks = []
    for start in progress(range(0, len(reports), batch_size), desc="embed texts", unit="batch"):
        chunks.append(model.encode_texts([r.text for r in reports[start : start + batch_size]]))
    embeddings = torch.cat(chunks).cpu().numpy().astype(np.float32)  # one host copy for the whole corpus
    save_text_embeddings(cache_dir, embeddings, reports, model.identity)
    return embeddings


@torch.no_grad()
def embed_images(
    model: PairingModel, dataset: ImageDataset, split: str, batch_size: int = 256, num_workers: int = 0
) -> torch.Tensor:
    """All images of a split, encoded in batches; results stay on the model's device (no per-image sync)."""
    loader = DataLoader(
        _Preprocessed(dataset, split, model.preprocess),
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=model.device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if num_workers else None,
    )
    try:
        feats = [model.encode_images(batch) for batch in progress(loader, desc=f"embed {split} images", unit="batch")]
    except DatasetError as err:
        raise worker_error(err) from None
    return torch.cat(feats)


ENCODER_FILE = "encoder.json"  # in the pairing dir: the pairing model's image-encoder size


def pairs_meta(
    model_identity: dict, texts: list[Report], top_k: int, spec: dict | None, identity: dict | None = None
) -> dict:
    return {
        "model": model_identity,
        "fingerprint": corpus_fingerprint(texts),
        "num_texts": len(texts),
        "top_k": int(top_k),
        "spec": spec or {},
        **({"identity": identity} if identity is not None else {}),
    }


def read_pairs_meta(path: str | Path) -> dict | None:
    """The meta of a pairs file; None for files without one (made before meta existed) or unreadable ones."""
    try:
        with np.load(path) as data:
            return json.loads(str(data["meta"])) if "meta" in data.files else None
    except (OSError, ValueError, KeyError, EOFError):
        return None


def pair_dataset(
    model: PairingModel,
    dataset: ImageDataset,
    reports: list[Report],
    out_dir: str | Path,
    top_k: int = 1,
    batch_size: int = 256,
    num_workers: int = 0,
    search: str = "auto",
    spec: dict | None = None,
    identity: dict | None = None,
) -> dict[str, Path]:
    """Pair every split of `dataset` with its top-k texts; returns split -> pairs file. `identity` (the
    config's `pairing_identity`) is recorded in each file for the rerun's comparison."""
    out_dir = Path(out_dir)
    if not reports:
        raise ValueError("no texts to pair with")
    if top_k > len(reports):
        raise ConfigError(f"pairing.top_k={top_k} but the corpus has only {len(reports)} texts; lower pairing.top_k")
    text = torch.from_numpy(prepare_texts(model, reports, out_dir, batch_size))
    meta = pairs_meta(model.identity, reports, top_k, spec, identity)
    paths = {}
    for split in dataset.splits:
        path = out_dir / f"pairs-{split}.npz"
        paths[split] = path
        if path.exists():
            if read_pairs_meta(path) == json.loads(json.dumps(meta)):
                continue
            log.info("%s: made by another model, corpus or top_k; recomputing", path)
        images = embed_images(model, dataset, split, batch_size, num_workers)
        indices, scores = topk_cosine(images, text.to(images.device), k=top_k, backend=search)
        write_pairs(path, indices, scores, dataset, split, meta)
    return paths


def prepare_texts(model: PairingModel, reports: list[Report], out_dir: Path, batch_size: int) -> np.ndarray:
    """The corpus embeddings (cached under <out_dir>/text-embeddings) and the encoder-size record."""
    text = embed_reports(model, reports, out_dir / "text-embeddings", batch_size)
    # what a method that needs the retrieved report at test time runs besides itself (the report's cost)
    atomic_write_json(
        out_dir / ENCODER_FILE, {"model": model.name, "image_encoder_parameters": model.image_encoder_parameters()}
    )
    return text


def write_pairs(path: Path, indices, scores, dataset: ImageDataset, split: str, meta: dict) -> None:
    """One split's pairs file: indices/scores [N, k] in the dataset's sample order, with keys, labels, meta."""
    atomic_save_npz(
        path,
        indices=indices,
        scores=scores,
        keys=np.array(dataset.keys(split)),
        labels=dataset.labels(split),
        meta=np.array(json.dumps(meta, sort_keys=True)),
    )


def load_pairs(path: str | Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {name: data[name] for name in data.files}


# ------------------------------------------------------------------------- config-level (pipeline, CLI)


def pairing_spec(cfg) -> dict:
    """What the config asks of pairing (known without loading the model): a pairs file records it, so a
    rerun can tell without building the model whether the files on disk are the ones asked for."""
    p = cfg.pairing
    spec = {"model": p.model, "checkpoint": p.checkpoint, "precision": p.precision}
    if p.from_reference:  # imported pairs (pairing/reference.py): current while the same files are there
        from clipit.pairing.reference import reference_digest

        spec |= {"from_reference": p.from_reference, "reference_sha256": reference_digest(p.from_reference)}
    return spec


def pairing_identity(cfg, dataset: ImageDataset, texts: list[Report]) -> dict:
    """What the pairs depend on, keyed as the config spells it: the pairing model and k, the texts (the
    corpus that reports.* and pairing.texts select, by content) and the images (the dataset, its split sizes
    and sample keys; the demo's generator settings). Not data.root (a moved dataset is the same one),
    batch_size, num_workers, device or search (both backends are exact). Not pairing.checkpoint either:
    a path, compared as before through `pairing_spec` (another path pairs again, which a copied output
    folder needs; the weights' sha256 is in the pairs' `model` record, and the shards compare it)."""
    p, d = cfg.pairing, cfg.data
    keys = hashlib.sha256(json.dumps({s: list(map(str, dataset.keys(s))) for s in dataset.splits}).encode())
    data = {
        "name": d.name,
        "sizes": {s: dataset.split_size(s) for s in dataset.splits},
        "keys_sha256": keys.hexdigest(),
    }
    if d.name == "demo":
        data["demo"] = {"counts": dict(d.demo.counts), "image_size": d.demo.image_size, "seed": d.demo.seed}
    return json.loads(
        json.dumps(
            {
                "pairing": {
                    "model": p.model,
                    "precision": p.precision,
                    "top_k": p.top_k,
                    "texts": p.texts,
                },
                "texts": {"count": len(texts), "fingerprint": corpus_fingerprint(texts)},
                "data": data,
            },
            default=str,
        )
    )


def check_pairs_identity(paths: dict[str, Path], identity: dict, overwrite: bool = False) -> bool:
    """False when a pairs file on disk was made under another config and `--overwrite` replaces it; one
    line naming the changed keys without it; True when every file records this identity (or none: files
    written before identities were recorded keep the older comparison, current_pairs)."""
    for split, path in paths.items():
        stored = (read_pairs_meta(path) or {}).get("identity") if path.exists() else None
        changes = identity_changes(stored, identity) if isinstance(stored, dict) else ""
        if not changes:
            continue
        if overwrite:
            return False
        raise changed_output(
            path,
            f"the {split} pairs were made",
            changes,
            "set pairing.dir to a new folder",
            f"rerun `clipit pair --config <config>` with `{OVERWRITE}`",
        )
    return True


def current_pairs(cfg, dataset: ImageDataset, texts: list[Report], overwrite: bool = False) -> dict[str, Path] | None:
    """split -> pairs file if every split's pairs exist and were made for this config and these texts;
    pairs made under another config stop with one line unless `--overwrite` (then None: recompute)."""
    out = Path(cfg.pairing.dir)
    paths = {s: out / f"pairs-{s}.npz" for s in dataset.splits}
    if not check_pairs_identity(paths, pairing_identity(cfg, dataset, texts), overwrite):
        return None
    if not (out / "text-embeddings" / "identity.json").exists():
        return None
    fingerprint = corpus_fingerprint(texts)
    for path in paths.values():
        meta = read_pairs_meta(path) if path.exists() else None
        if (
            meta is None
            or meta.get("fingerprint") != fingerprint
            or meta.get("top_k") != cfg.pairing.top_k
            or meta.get("spec") != json.loads(json.dumps(pairing_spec(cfg)))
        ):
            return None
    return paths


def import_reference_pairs(
    build_model,
    dataset: ImageDataset,
    reports: list[Report],
    corpus_path,
    ref_dir,
    out_dir,
    batch_size: int,
    spec: dict,
    identity: dict | None = None,
) -> dict[str, Path]:
    """`clipit pair` with pairing.from_reference: every file checked and mapped first, then the corpus
    embedded with the pairing model `build_model()` (the shards and the cached teacher need the
    embeddings) and one pairs file per split written (top-1, in our sample order)."""
    from clipit.pairing.reference import map_reference_pairs

    out_dir = Path(out_dir)
    pairs = map_reference_pairs(dataset, reports, corpus_path, ref_dir)
    model = build_model()
    prepare_texts(model, reports, out_dir, batch_size)
    meta = pairs_meta(model.identity, reports, 1, spec, identity)
    paths = {}
    for split, (indices, scores) in pairs.items():
        paths[split] = out_dir / f"pairs-{split}.npz"
        write_pairs(paths[split], indices, scores, dataset, split, meta)
    return paths
