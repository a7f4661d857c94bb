"""The pairing stage: report embeddings (cached), image embeddings (batched), top-k pairs per split.

Outputs, per split, `<pairing.dir>/pairs-<split>.npz` with `indices` [N, k], `scores` [N, k] and
the dataset `keys`, written atomically; a rerun skips splits whose file exists.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from clipit.data.base import ImageDataset, decode_image
from clipit.io import atomic_save_npz
from clipit.pairing.models import PairingModel
from clipit.pairing.search import topk_cosine
from clipit.reports import Report, corpus_fingerprint, load_text_embeddings, save_text_embeddings


class _Preprocessed(Dataset):
    """Decode + the pairing model's own preprocessing, run in DataLoader workers."""

    def __init__(self, dataset: ImageDataset, split: str, preprocess):
        self.dataset, self.split, self.preprocess = dataset, split, preprocess

    def __len__(self):
        return self.dataset.split_size(self.split)

    def __getitem__(self, index):
        return self.preprocess(decode_image(self.dataset.sample(self.split, index).data))


def embed_reports(model: PairingModel, reports: list[Report], cache_dir: str | Path,
                  batch_size: int = 256) -> np.ndarray:
    """Text embeddings of the corpus, computed once per (model identity, corpus) and cached."""
    fingerprint = corpus_fingerprint(reports)
    cached = load_text_embeddings(cache_dir, expect_identity=model.identity, expect_fingerprint=fingerprint)
    if cached is not None:
        return cached[0]
    chunks = []
    for start in tqdm(range(0, len(reports), batch_size), desc="embed reports", unit="batch", leave=False):
        chunks.append(model.encode_texts([r.text for r in reports[start : start + batch_size]]).cpu())
    embeddings = torch.cat(chunks).numpy().astype(np.float32)
    save_text_embeddings(cache_dir, embeddings, reports, model.identity)
    return embeddings


@torch.no_grad()
def embed_images(model: PairingModel, dataset: ImageDataset, split: str, batch_size: int = 256,
                 num_workers: int = 0) -> torch.Tensor:
    """All images of a split, encoded in batches; results stay on the model's device."""
    loader = DataLoader(_Preprocessed(dataset, split, model.preprocess), batch_size=batch_size,
                        num_workers=num_workers, pin_memory=model.device.type == "cuda")
    feats = [model.encode_images(batch) for batch in tqdm(loader, desc=f"embed {split} images", unit="batch", leave=False)]
    return torch.cat(feats)


def pair_dataset(model: PairingModel, dataset: ImageDataset, reports: list[Report], out_dir: str | Path,
                 top_k: int = 1, batch_size: int = 256, num_workers: int = 0) -> dict[str, Path]:
    """Pair every split of `dataset` with its top-k reports; returns split -> pairs file."""
    out_dir = Path(out_dir)
    text = torch.from_numpy(embed_reports(model, reports, out_dir / "text-embeddings", batch_size))
    paths = {}
    for split in dataset.splits:
        path = out_dir / f"pairs-{split}.npz"
        paths[split] = path
        if path.exists():
            continue
        images = embed_images(model, dataset, split, batch_size, num_workers)
        indices, scores = topk_cosine(images, text.to(images.device), k=top_k)
        keys = np.array(dataset.keys(split))
        atomic_save_npz(path, indices=indices, scores=scores, keys=keys, labels=dataset.labels(split))
    return paths


def load_pairs(path: str | Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {name: data[name] for name in data.files}
