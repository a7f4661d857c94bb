"""Synthetic, deterministic demo data: H&E-like patches and the demo image folder that holds them. The
demo's texts (an UNPAIRED report corpus, and a separate paired image-caption set for training the demo
CLIP) are made in clipit/data/demo_text.py. Nothing is stored in the repo; all is made at run time.

Classes differ in nuclear density, size and arrangement (CRC-like). DEMO_CLASSES is sorted so that
ImageFolderDataset (classes = sorted folder names) gives label i == DEMO_CLASSES[i].
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from clipit.data.base import DatasetError
from clipit.data.folder import ImageFolderDataset
from clipit.io import atomic_dir, read_json_object

DEMO_CLASSES: tuple[str, ...] = ("lymphocytes", "normal_mucosa", "stroma", "tumor")
LYM, MUC, STR, TUM = range(4)
META_FILE = "demo_meta.json"  # what a demo folder holds, written last: its presence marks it complete
GENERATOR_VERSION = 1  # bump when rendering changes, so cached demo folders are rebuilt
# Separate seed streams so the demo images, the CLIP's paired set and the reports never share draws.
STREAM_IMAGES, STREAM_PAIRED, STREAM_REPORTS = 11, 22, 33

# Ruifrok & Johnston optical-density stain vectors (RGB): Beer-Lambert mixing gives real H&E hues.
_H_OD = np.array([0.65, 0.70, 0.29])
_E_OD = np.array([0.10, 0.85, 0.40])  # a little bluer than Ruifrok: pink, not magenta


def _nuclei(draw, rng, n, centers, a, b, theta, value, jag=0.1, k=10):
    """Draw n irregular rotated ellipses (polygons, so shape jitter = pleomorphism) onto the H map."""
    t = np.linspace(0, 2 * np.pi, k, endpoint=False)
    r = 1 + jag * rng.standard_normal((n, k))
    x, y = a[:, None] * np.cos(t) * r, b[:, None] * np.sin(t) * r
    c, s = np.cos(theta)[:, None], np.sin(theta)[:, None]
    px, py = centers[:, :1] + c * x - s * y, centers[:, 1:] + s * x + c * y
    for i in range(n):
        draw.polygon(list(zip(px[i].tolist(), py[i].tolist())), fill=int(value[i]))


def _render_one(label: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Return (hematoxylin, eosin) density maps in [0, ~1.3] for one patch."""
    s = size / 64.0
    U = rng.uniform
    dens = U(0.75, 1.25)  # per-patch density jitter
    h_img, e_img = Image.new("L", (size, size), 0), Image.new("L", (size, size), 0)
    hd, ed = ImageDraw.Draw(h_img), ImageDraw.Draw(e_img)
    ed.rectangle([0, 0, size, size], fill=int(U(90, 130)))  # eosin base (x/200 = density)

    def scatter(n, amin, amax, aspect, v, jag=0.1, theta=None, theta_sd=np.pi):
        n = max(1, int(n))
        a = U(amin, amax, n) * s
        th = rng.uniform(0, np.pi, n) if theta is None else theta + theta_sd * rng.standard_normal(n)
        _nuclei(hd, rng, n, U(-2, size + 2, (n, 2)), a, a * U(*aspect, n), th, U(*v, n) * 200, jag)

    if label == LYM:  # dense small round dark nuclei
        scatter(U(70, 115) * dens * s * s, 1.5, 2.3, (0.8, 1.0), (0.95, 1.15), 0.06)
    elif label == TUM:  # crowded, large, pleomorphic, hyperchromatic; dense pink cytoplasm
        ed.rectangle([0, 0, size, size], fill=int(U(120, 150)))
        scatter(U(24, 38) * dens * s * s, 3.4, 6.0, (0.5, 0.9), (0.8, 1.1), 0.18)
        if rng.random() < 0.5:  # nucleoli
            scatter(U(4, 10), 0.6, 1.0, (0.9, 1.0), (1.2, 1.3), 0.0)
    elif label == STR:  # sparse elongated spindle nuclei aligned with wavy pink fibres
        th0 = U(0, np.pi)
        ed.rectangle([0, 0, size, size], fill=int(U(140, 175)))
        for _ in range(int(U(18, 30) * s)):
            x0, y0 = U(-10, size + 10, 2)
            L = U(15, 40) * s
            t = np.linspace(0, 1, 5)
            xs = x0 + L * t * np.cos(th0) + U(-1.5, 1.5, 5)
            ys = y0 + L * t * np.sin(th0) + U(-1.5, 1.5, 5)
            ed.line(list(zip(xs.tolist(), ys.tolist())), fill=int(U(185, 230)), width=max(1, int(s)))
        scatter(U(5, 13) * dens * s * s, 4.0, 7.5, (0.15, 0.3), (0.6, 0.85), 0.05, theta=th0, theta_sd=0.2)
    else:  # normal mucosa: nuclei in rings around pale round gland lumens (arrangement, not size)
        scatter(U(5, 14) * s * s, 1.5, 2.2, (0.8, 1.0), (0.7, 0.9), 0.06)  # lamina propria cells
        for _ in range(int(rng.integers(1, 4))):
            cx, cy = U(0, size, 2)
            R = U(5.5, 11) * s
            ring = R + 6 * s
            ed.ellipse([cx - ring, cy - ring, cx + ring, cy + ring], fill=int(U(45, 70)))  # pale mucin cytoplasm
            ed.ellipse([cx - R, cy - R, cx + R, cy + R], fill=int(U(0, 12)))  # lumen
            n = max(6, int(2 * np.pi * (R + 4.5 * s) / (3.6 * s)))
            phi = np.linspace(0, 2 * np.pi, n, endpoint=False) + U(0, 1)
            rr = R + U(4.0, 5.5, n) * s
            cen = np.stack([cx + rr * np.cos(phi), cy + rr * np.sin(phi)], 1)
            a = U(2.2, 2.9, n) * s
            _nuclei(hd, rng, n, cen, a, a * U(0.45, 0.6, n), phi, U(0.8, 1.0, n) * 200, 0.06)
    if rng.random() < 0.15:  # a few stray lymphocytes anywhere: realistic, keeps the task non-trivial
        scatter(U(4, 12), 1.5, 2.2, (0.8, 1.0), (0.9, 1.1), 0.06)
    h_img = h_img.filter(ImageFilter.GaussianBlur(0.6 * s))
    e_img = e_img.filter(ImageFilter.GaussianBlur(0.8 * s))
    return np.asarray(h_img, np.float32) / 200, np.asarray(e_img, np.float32) / 200


def render_patches(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """N x size x size x 3 uint8 H&E-like patches, one per label (index into DEMO_CLASSES)."""
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    H, E = np.empty((n, size, size), np.float32), np.empty((n, size, size), np.float32)
    for i, lab in enumerate(labels):
        H[i], E[i] = _render_one(int(lab), size, rng)
    # Smooth low-frequency tissue density variation (bilinear-upsampled coarse grid) + chromatin texture.
    g = max(2, size // 16)
    up = np.clip(np.linspace(0, g - 1, size)[:, None] - np.arange(g)[None], -1, 1)
    up = (1 - np.abs(up)).astype(np.float32)  # size x g linear-interpolation weights
    E *= up @ rng.normal(1.0, 0.12, (n, g, g)).astype(np.float32) @ up.T
    H *= 1 + 0.12 * rng.standard_normal(H.shape, dtype=np.float32)
    # Per-patch stain jitter: intensity and slight hue shift of each stain vector.
    h_vec = (_H_OD * rng.uniform(0.8, 1.2, (n, 1)) + rng.normal(0, 0.04, (n, 3))).astype(np.float32)
    e_vec = (_E_OD * rng.uniform(0.75, 1.25, (n, 1)) + rng.normal(0, 0.03, (n, 3))).astype(np.float32)
    od = H[..., None] * h_vec[:, None, None] + E[..., None] * e_vec[:, None, None]
    img = np.exp(-od - 0.03, out=od)
    img *= 255
    img += 3.0 * rng.standard_normal(img.shape, dtype=np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def balanced_labels(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.arange(n) % len(DEMO_CLASSES))


def image_request(counts: dict[str, int], size: int, seed: int) -> dict:
    return {
        "counts": {k: int(v) for k, v in counts.items()},
        "size": int(size),
        "seed": int(seed),
        "classes": list(DEMO_CLASSES),
        "generator_version": GENERATOR_VERSION,
    }


def images_current(root: Path, counts: dict[str, int], size: int = 64, seed: int = 0) -> bool:
    """Whether `root` holds a complete demo folder generated with exactly these settings."""
    try:
        return json.loads((Path(root) / META_FILE).read_text()) == image_request(counts, size, seed)
    except (OSError, ValueError):
        return False


def write_demo_images(root: Path, counts: dict[str, int], size: int = 64, seed: int = 0) -> Path:
    """Write root/<split>/<class>/<split>_<idx:06d>.png. Skips if root holds the same (counts, size, seed);
    rebuilds otherwise. Built in a temp sibling then renamed, so root is never half-written."""
    root = Path(root)
    meta = image_request(counts, size, seed)
    if images_current(root, counts, size, seed):
        return root
    with atomic_dir(root) as tmp:  # never a half-built tree: the old one or the new one
        for split, n in counts.items():  # per-split stream keyed by name: splits don't depend on each other
            rng = np.random.default_rng([seed, STREAM_IMAGES, zlib.crc32(split.encode())])
            labels = balanced_labels(int(n), rng)
            for c in DEMO_CLASSES:
                (tmp / split / c).mkdir(parents=True, exist_ok=True)
            for start in range(0, int(n), 512):  # chunks bound memory for large counts
                imgs = render_patches(labels[start : start + 512], size, rng)
                for j, img in enumerate(imgs, start):
                    Image.fromarray(img).save(
                        tmp / split / DEMO_CLASSES[labels[j]] / f"{split}_{j:06d}.png", compress_level=1
                    )  # fast; 64-px PNGs are small anyway
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))  # written last: marks completion
    return root


class DemoDataset(ImageFolderDataset):
    """The generated demo images, read like any image folder (`data.name: demo`). Its demo_meta.json says
    which splits and how many images the folder holds; a folder that disagrees with it is refused."""

    name = "demo"
    fixed_size = True  # every patch is data.demo.image_size square

    def __init__(self, root: str | Path):
        root = Path(root)

        def damaged(path: Path, why: str) -> DatasetError:
            return DatasetError(f"{path}: {why}")

        fix = "generate the demo data with `clipit prepare demo --config CONFIG`"
        meta = read_json_object(root / META_FILE, fix, error=damaged)
        counts = meta.get("counts")
        if meta.get("classes") != list(DEMO_CLASSES) or not isinstance(counts, dict) or not counts:
            raise damaged(root / META_FILE, f"not a demo folder record; delete {root} and {fix}")
        super().__init__(root, splits=tuple(counts), classes=DEMO_CLASSES)
        for split, n in counts.items():
            if self.split_size(split) != n:
                raise DatasetError(
                    f"{root / split}: {self.split_size(split):,} images but {META_FILE} records {n:,}; "
                    f"delete {root} and {fix}"
                )
