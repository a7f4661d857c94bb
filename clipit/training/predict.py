"""Forward passes over an evaluation loader: logits, labels and keys of every sample, gathered over
ranks, with the mean loss terms. Used by validation during training and by test evaluation.

Nothing here passes silently: a non-finite logit or loss is a `NonFiniteError` naming the samples
(and their shards), and a shard that cannot be read while iterating is a `ShardError` naming it
(`ShardSource.batches`, also used by the training loop).
"""

from __future__ import annotations

import functools
import math
import re
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from clipit.errors import ClipitError, one_line
from clipit.io import sha256_file
from clipit.models.clipit import clipit_loss
from clipit.shards.manifest import MANIFEST, ShardError, shard_path, split_urls
from clipit.shards.order import split_order
from clipit.training.text_side import TextInputs, cached_text

# what a damaged shard raises while it is read and decoded (tar, PNG/JPEG/TIFF, npy, JSON, the label)
DATA_ERRORS = (OSError, EOFError, ValueError, KeyError, SyntaxError, tarfile.TarError, zlib.error)
_KEY = re.compile(r"^([A-Za-z]+)_(\d+)$")  # shards/manifest.py names sample i of a split `<split>_<i:08d>`
_SCAN_LIMIT = 4 << 30  # bytes of shards hashed to find the damaged one when an error does not name it


class NonFiniteError(ClipitError):
    """A loss, gradient, weight or prediction is NaN or infinite: training or evaluation stops."""


@dataclass(frozen=True)
class ShardSource:
    """One split of a shard set, to name the shard behind a sample key or a read error."""

    shard_dir: Path
    split: str
    manifest: dict

    @property
    def urls(self) -> list[str]:
        return split_urls(self.shard_dir, self.split, self.manifest)

    @functools.cached_property
    def _positions(self) -> np.ndarray | None:
        """Write position of each dataset index of a shuffled split (shards/order.py); None: dataset order."""
        try:
            order = split_order(self.manifest, self.split, self.shard_dir / MANIFEST)
        except ClipitError:  # only names shards in messages: a set that cannot say is named without them
            return None
        if order is None:
            return None
        positions = np.empty_like(order)
        positions[order] = np.arange(len(order))
        return positions

    def shard_of(self, key: str) -> str | None:
        match = _KEY.match(str(key))
        per_shard = self.manifest.get("samples_per_shard")
        if not match or not per_shard:
            return None
        split, index = match.group(1), int(match.group(2))
        if split == self.split and self._positions is not None:
            if index >= len(self._positions):
                return None
            index = int(self._positions[index])
        return str(shard_path(self.shard_dir, split, index // int(per_shard)))

    def describe(self, keys: list[str], limit: int = 3) -> str:
        """'train_00000003 (…/train-000000.tar), …' for the first `limit` keys."""
        named = [f"{k} ({self.shard_of(k)})" if self.shard_of(k) else str(k) for k in keys[:limit]]
        return ", ".join(named) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")

    def batches(self, loader: Iterable, what: str) -> Iterator:
        """The loader's batches; a read or decode error becomes one ShardError naming the shard."""
        iterator = iter(loader)
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                return
            except ClipitError:
                raise
            except DATA_ERRORS as err:
                raise self.read_error(err, what) from err
            yield batch

    def read_error(self, err: BaseException, what: str) -> ShardError:
        urls = self.urls
        text = " ".join(str(a) for a in getattr(err, "args", ())) + " " + str(err)
        shard = next((u for u in urls if u in text), None)
        if shard is None:
            key = next((w for w in re.findall(r"[A-Za-z]+_\d{8}", text)), None)
            shard = self.shard_of(key) if key else None
        if shard is None:
            damaged = self._damaged(urls)
            shard = damaged[0] + (f" (and {len(damaged) - 1} more)" if len(damaged) > 1 else "") if damaged else None
        args = getattr(err, "args", ())
        detail = f"{type(err).__name__}: {' '.join(str(args[0]).split())[:200]}" if args else one_line(err)
        where = shard or f"a shard of the {self.split} split in {self.shard_dir}"
        return ShardError(
            f"{where}: cannot be read during {what} ({detail}); the shard is damaged: delete it and "
            f"rebuild it with `clipit shard build --config <config>` (`clipit shard validate "
            f"{self.shard_dir}` checks every shard)"
        )

    def _damaged(self, urls: list[str]) -> list[str]:
        """Shards of the split whose sha256 differs from the manifest (only for sets small enough to hash)."""
        entries = {
            str(Path(self.shard_dir) / s["path"]): s.get("sha256")
            for s in self.manifest["splits"][self.split]["shards"]
        }
        try:
            if sum(Path(u).stat().st_size for u in urls) > _SCAN_LIMIT:
                return []
            return [u for u in urls if entries.get(u) and sha256_file(u) != entries[u]]
        except OSError:
            return [u for u in urls if not Path(u).is_file()]


@torch.no_grad()
def predict(
    model,
    preprocess,
    loader,
    accelerator: Accelerator,
    lam: float,
    text_inputs: TextInputs | None = None,
    what: str = "prediction",
    source: ShardSource | None = None,
    hint: str = "",
    ce_input: str = "logits",
) -> dict:
    """Logits, labels and keys of every sample (gathered over ranks) and the mean loss terms.

    The bare module runs, not the DDP/DeepSpeed wrapper: ranks hold different numbers of eval batches
    (none at all with fewer shards than ranks), and DDP's forward broadcasts buffers (the text tower
    has some), a collective that a rank without batches would never join. A non-finite logit or loss
    term raises NonFiniteError on every rank (after the gather, so all ranks agree)."""
    wrapper, model = model, accelerator.unwrap_model(model) if hasattr(model, "module") else model  # DDP / DeepSpeed
    wrapper.eval()
    logits, labels, keys, terms, bad_text = [], [], [], [], []
    for batch in source.batches(loader, what) if source is not None else loader:
        images = preprocess(batch["images"].to(accelerator.device, non_blocking=True))
        inputs = (text_inputs or cached_text)(batch, accelerator.device)
        with accelerator.autocast():
            out = model(images, **inputs)
        target = batch["labels"].to(accelerator.device, non_blocking=True)
        losses = clipit_loss(out, target, inputs["text_emb"], lam, ce_input)
        n = len(target)
        terms.append({k: float(v) * n for k, v in losses.items()} | {"n": n})
        logits.append(out["logits"].float().cpu().numpy())
        labels.append(batch["labels"].numpy())
        keys += batch["keys"]
        text = inputs.get("text_emb")
        if text is not None and text.numel():
            rows = (~torch.isfinite(text.float()).all(dim=1)).cpu().numpy()
            bad_text += [k for k, bad in zip(batch["keys"], rows) if bad]
    wrapper.train()
    parts = gather_object(
        [
            (
                np.concatenate(logits) if logits else np.zeros((0, 0)),
                np.concatenate(labels) if labels else np.zeros(0, np.int64),
                keys,
                terms,
                bad_text,
            )
        ]
    )
    logits = np.concatenate([p[0] for p in parts if len(p[1])])
    labels = np.concatenate([p[1] for p in parts if len(p[1])])
    keys = [k for p in parts for k in p[2]]
    terms = [t for p in parts for t in p[3]]
    bad_text = sorted(k for p in parts for k in p[4])
    total = sum(t["n"] for t in terms)
    loss_terms = {k: sum(t[k] for t in terms if k in t) / total for k in terms[0] if k != "n"}
    order = np.argsort(keys, kind="stable")  # rank order differs between world sizes; keys do not
    result = {"logits": logits[order], "labels": labels[order], "keys": [keys[i] for i in order], **loss_terms}
    check_finite(result, what, source, bad_text, hint)
    return result


def check_finite(
    result: dict, what: str, source: ShardSource | None = None, bad_text: list[str] = (), hint: str = ""
) -> None:
    """NonFiniteError naming the samples if any logit or loss term of `predict`'s result is not finite;
    samples whose report embedding is not finite are named as the likely cause."""
    rows = ~np.isfinite(result["logits"]).all(axis=1) if result["logits"].size else np.zeros(0, bool)
    terms = [(k, v) for k, v in result.items() if k not in ("logits", "labels", "keys") and not math.isfinite(v)]
    if not rows.any() and not terms:
        return
    describe = source.describe if source is not None else (lambda ks: ", ".join(map(str, ks[:3])))
    if rows.any():
        bad = [result["keys"][i] for i in np.flatnonzero(rows)]
        problem = f"non-finite logits for {len(bad)} of {len(rows)} samples: {describe(bad)}"
    else:
        problem = f"the mean {terms[0][0]} is {terms[0][1]}"
    shards = source.shard_dir if source is not None else "<shard dir>"
    if bad_text:  # the data explains it: the shards need fixing, not the settings
        raise NonFiniteError(
            f"{what}: {problem} because {samples(len(bad_text))} non-finite report "
            f"embeddings: {describe(bad_text)}; check the shards with `clipit shard validate "
            f"{shards}` and rebuild the damaged ones"
        )
    raise NonFiniteError(
        f"{what}: {problem}; check the shards with `clipit shard validate {shards}`" + (f"; {hint}" if hint else "")
    )


def samples(n: int) -> str:
    return f"{n} sample has" if n == 1 else f"{n} samples have"
