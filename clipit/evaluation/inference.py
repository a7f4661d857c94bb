"""`clipit predict MODEL_DIR IMAGE...`: class probabilities per image from an exported model.

Images go through the same steps as evaluation: decode (every mode and bit depth) and bring to the
model's input size exactly as the shard loader does (training.loader.load_image), keep them uint8
until the device, then DevicePreprocess (normalise; no augmentation). A file that is no usable image
(not an image, truncated, an unsupported mode, a decompression bomb above PIL's MAX_IMAGE_PIXELS) is
one line naming it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from clipit.evaluation.export import ExportError, load_exported
from clipit.data.base import ImageDecodeError
from clipit.training.loader import load_image


def read_image(path: str | Path, size: int) -> np.ndarray:
    """uint8 HWC at size x size, decoded exactly as the shard loader decodes a stored image."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ExportError(f"{path}: cannot read image ({err.strerror or type(err).__name__})") from None
    try:
        return load_image(data, size)
    except ImageDecodeError as err:
        raise ExportError(f"{path}: not a usable image ({err}); pass image files (png, jpg, tif)") from None


@torch.no_grad()
def predict_arrays(model, preprocess, images: list[np.ndarray], batch_size: int = 32) -> np.ndarray:
    """Class probabilities [N, C] for uint8 HWC images; same-shape images are batched together."""
    device = preprocess.mean.device
    probs = np.zeros((len(images), 0), np.float32)
    out: dict[int, np.ndarray] = {}
    by_shape: dict[tuple, list[int]] = {}
    for i, image in enumerate(images):
        by_shape.setdefault(image.shape, []).append(i)
    for indices in by_shape.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            x = torch.from_numpy(np.stack([images[i] for i in chunk])).to(device)
            logits = model(preprocess(x))["logits"].float()
            for i, row in zip(chunk, torch.softmax(logits, dim=1).cpu().numpy()):
                out[i] = row
    if out:
        probs = np.stack([out[i] for i in range(len(images))])
    return probs


def predict_files(model_dir: str | Path, paths: list[str | Path], device: str = "cpu",
                  batch_size: int = 32) -> tuple[list[str], np.ndarray]:
    """(classes, probabilities [len(paths), C]) for image files."""
    model, preprocess, config = load_exported(model_dir, device)
    images = [read_image(p, preprocess.size) for p in paths]
    return config["classes"], predict_arrays(model, preprocess, images, batch_size)
