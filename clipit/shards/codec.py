"""How a sample's image and text embedding are stored in a shard.

Image codecs (`shards.codec`, recorded in the plan and the manifest as `image`):
    png   the encoded bytes as the dataset stores them, under their own field (`png`, or a dataset's
          `jpg`/`tif` files kept as they are). Any size; decoding costs ~90% of loading a 96-px tile.
    raw   the decoded RGB pixels, uint8 H x W x 3 in C order, under `img.u8`, no header. The set has one
          shape, recorded in the manifest ({"codec": "raw", "shape": [H, W, 3], "dtype": "uint8"}) and in
          every sample's json (`image_shape`), so a reader needs no manifest. Loading is a reshape.
    auto  raw for datasets whose images all have one size (ImageDataset.fixed_size: pcam, crc, bach, the
          demo), png otherwise; a set already in the shard folder keeps its codec (sets built before
          codecs existed are png), so a rerun never mixes two.
Both give the same pixels: raw stores exactly what `decode_image` makes of the source bytes.
Nothing here runs code from data: raw is plain bytes, the embedding a plain .npy (np.load refuses objects).
"""

from __future__ import annotations

import functools
import io
import json
import math

import numpy as np

from clipit.data.base import ImageDataset, ImageDecodeError, decode_image

CODECS = ("auto", "png", "raw")
ENCODED_FIELDS = ("png", "jpg", "jpeg", "tif", "tiff")  # the field names an encoded image may be stored under
RAW_FIELD = "img.u8"
IMAGE_FIELDS = ENCODED_FIELDS + (RAW_FIELD,)  # every field an image may be stored under
PNG = {"codec": "png"}  # the spec of sets written before codecs existed, too


def image_spec(manifest: dict) -> dict:
    """The image codec a plan or manifest records (png when it records none: a set from before codecs)."""
    return manifest.get("image", PNG)


def spec_problem(spec) -> str | None:
    """Why a recorded image spec is not one this module writes (None: it is)."""
    if spec == PNG:
        return None
    if isinstance(spec, dict) and spec.get("codec") == "raw" and set(spec) == {"codec", "shape", "dtype"}:
        if spec["dtype"] == "uint8" and shape_problem(spec["shape"]) is None:
            return None
    return f"image {spec!r} is neither {PNG} nor {{'codec': 'raw', 'shape': [H, W, 3], 'dtype': 'uint8'}}"


def shape_problem(shape) -> str | None:
    if (
        isinstance(shape, list)
        and len(shape) == 3
        and shape[2] == 3
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape)
    ):
        return None
    return f"{shape!r} is not an [H, W, 3] shape"


def field_codec(field: str) -> str:
    return "raw" if field == RAW_FIELD else "png"


def resolve_image(setting: str, dataset: ImageDataset, existing: str | None = None) -> dict:
    """The image spec a build writes: `setting` (auto | png | raw) for `dataset`; `existing` is the codec of
    a set already in the folder (auto keeps it). raw takes its shape from the first image."""
    if setting not in CODECS:
        raise ValueError(f"shards.codec {setting!r}: choose one of {', '.join(CODECS)}")
    if setting == "auto":
        setting = existing or ("raw" if dataset.fixed_size else "png")
    if setting == "png":
        return dict(PNG)
    split = next((s for s in dataset.splits if dataset.split_size(s)), None)
    if split is None:
        return dict(PNG)  # no image to take a shape from (and none to store)
    pixels = np.asarray(decode_image(dataset.sample(split, 0).data))
    return {"codec": "raw", "shape": [int(v) for v in pixels.shape], "dtype": "uint8"}


def encode_image(data: bytes, ext: str, spec: dict) -> tuple[str, bytes, np.ndarray]:
    """(field, payload, pixels) of an image stored as `data` (field `ext`) under `spec`. The bytes are fully
    decoded either way (a corrupt image fails the build, not training; raises ImageDecodeError), and raw
    checks the set's shape (ValueError naming both shapes)."""
    pixels = np.asarray(decode_image(data), dtype=np.uint8)
    if spec["codec"] != "raw":
        return ext, data, pixels
    if list(pixels.shape) != spec["shape"]:
        raise ValueError(f"is {_dims(pixels.shape)} but this raw set stores {_dims(spec['shape'])} images")
    return RAW_FIELD, np.ascontiguousarray(pixels).tobytes(), pixels


def image_field(sample: dict) -> str | None:
    return next((f for f in IMAGE_FIELDS if f in sample), None)


def sample_pixels(sample: dict, meta: dict | None = None) -> np.ndarray:
    """uint8 H x W x 3 of a shard sample, whichever codec (raw: a read-only view, no copy). `meta` is the
    sample's parsed json (parsed here when raw needs it and it is not given). Raises ImageDecodeError (the
    reason; callers add the shard and sample) and KeyError when there is no image field."""
    field = image_field(sample)
    if field is None:
        raise KeyError("no image field")
    if field != RAW_FIELD:
        return np.asarray(decode_image(sample[field]), dtype=np.uint8)
    if meta is None:
        try:
            meta = json.loads(sample["json"])
        except (KeyError, ValueError, UnicodeDecodeError):
            raise ImageDecodeError("its json, which holds the raw image's shape, is missing or unreadable") from None
    shape = meta.get("image_shape") if isinstance(meta, dict) else None
    problem = shape_problem(shape)
    if problem:
        raise ImageDecodeError(f"json image_shape {problem}")
    data = sample[RAW_FIELD]
    if len(data) != math.prod(shape):
        raise ImageDecodeError(
            f"{len(data):,} bytes where {_dims(shape)} uint8 needs {math.prod(shape):,} (truncated or garbled)"
        )
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)


def _dims(shape) -> str:
    return "x".join(str(int(v)) for v in shape)


# ------------------------------------------------------------------------------- text embedding


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
    return np.load(io.BytesIO(data))  # object arrays refused by default
