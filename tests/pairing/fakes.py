"""Small real inputs for pairing and shard tests: an image folder, a report corpus, a tiny CLIP-like
model behind the PairingModel interface, and a config that points at them (no open_clip import)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from clipit.pairing.encoders import PairingModel

CLASSES = ("benign", "tumor")


class TinyClip(torch.nn.Module):
    """Linear image tower on 8x8 pixels, bag-of-bytes text tower: deterministic, instant."""

    def __init__(self, dim: int = 16, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.image = torch.nn.Linear(3 * 8 * 8, dim)
        self.text = torch.nn.EmbeddingBag(256, dim)

    def encode_image(self, x):
        return self.image(x.flatten(1))

    def encode_text(self, tokens):
        return self.text(tokens)


def shrunk_conch_config() -> dict:
    """conch-fork's conch_ViT-B-16 CoCa config with the same structure and tiny widths (needs conch-fork)."""
    from clipit.pairing.encoders import conch_config

    cfg = json.loads(json.dumps(conch_config()))
    cfg.update(embed_dim=32, embed_dim_caption=16)
    cfg["vision_cfg"].update(layers=1, width=32, num_heads=2, n_queries_caption=4, attn_pooler_heads=2)
    cfg["text_cfg"].update(width=32, heads=2, layers=1)
    cfg["multimodal_cfg"].update(width=16, heads=2, layers=1)
    return cfg


def tiny_preprocess(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img.resize((8, 8)), dtype=np.float32) / 255).permute(2, 0, 1)


def tiny_tokenize(texts: list[str]) -> torch.Tensor:
    return torch.tensor([list(t.encode()[:32].ljust(32, b" ")) for t in texts], dtype=torch.long)


def tiny_model(dim: int = 16) -> PairingModel:
    return PairingModel("tiny", TinyClip(dim), tiny_preprocess, tiny_tokenize, {"model": "tiny", "dim": dim})


def make_images(root: Path, counts: dict[str, int], size: int = 16, seed: int = 0) -> Path:
    """<root>/<split>/<class>/<i>.png with random pixels."""
    rng = np.random.default_rng(seed)
    for split, n in counts.items():
        for i in range(n):
            path = root / split / CLASSES[i % 2] / f"{split}_{i:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return root


def make_reports(path: Path, n: int = 12) -> Path:
    words = ["carcinoma", "benign", "stroma", "lymph node", "margin", "ductal", "necrosis", "grade"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for i in range(n):
            text = " ".join(words[(i + j) % len(words)] for j in range(3 + i % 4))
            fh.write(json.dumps({"id": f"R{i:03d}", "text": f"report {i}: {text}"}) + "\n")
    return path


def write_config(base: Path, images: Path, reports: Path, **sections) -> Path:
    cfg = {
        "name": "test",
        "output_dir": str(base / "run"),
        "data": {"name": "folder", "root": str(images)},
        "reports": {"path": str(reports)},
        "pairing": {
            "model": "conch",
            "checkpoint": str(base / "never-loaded.bin"),
            "top_k": 3,
            "batch_size": 8,
            "device": "cpu",
        },
        "shards": {"samples_per_shard": 4},
        "model": {"text_dim": 16},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path = base / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def pair_with_tiny_model(config_path: Path, dim: int = 16) -> dict:
    """Run the real pairing engine for a config, with the tiny model standing in for the configured one
    (the pairs record the config's spec, so `clipit shard build` accepts them as current)."""
    from clipit.config import load_config
    from clipit.pairing.engine import pair_dataset, pairing_spec
    from clipit.pairing.texts import pairing_texts
    from clipit.pipeline import build_image_dataset, load_corpus

    cfg = load_config(config_path)
    dataset, reports = build_image_dataset(cfg), load_corpus(cfg)
    texts = pairing_texts(cfg, dataset, reports)
    return pair_dataset(
        tiny_model(dim),
        dataset,
        texts,
        Path(cfg.pairing.dir),
        top_k=cfg.pairing.top_k,
        batch_size=cfg.pairing.batch_size,
        spec=pairing_spec(cfg),
    )
