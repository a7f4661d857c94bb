"""Forward passes over an evaluation loader: logits, labels and keys of every sample, gathered over
ranks, with the mean loss terms. Used by validation during training and by test evaluation."""
from __future__ import annotations

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from clipit.models.clipit import clipit_loss
from clipit.training.text_side import TextInputs, cached_text


@torch.no_grad()
def predict(model, preprocess, loader, accelerator: Accelerator, lam: float,
            text_inputs: TextInputs | None = None) -> dict:
    """Logits, labels and keys of every sample (gathered over ranks) and the mean loss terms.

    The bare module runs, not the DDP/DeepSpeed wrapper: ranks hold different numbers of eval batches
    (none at all with fewer shards than ranks), and DDP's forward broadcasts buffers (the text tower
    has some), a collective that a rank without batches would never join."""
    wrapper, model = model, accelerator.unwrap_model(model) if hasattr(model, "module") else model  # DDP / DeepSpeed
    wrapper.eval()
    logits, labels, keys, terms = [], [], [], []
    for batch in loader:
        images = preprocess(batch["images"].to(accelerator.device))
        inputs = (text_inputs or cached_text)(batch, accelerator.device)
        with accelerator.autocast():
            out = model(images, **inputs)
        target = batch["labels"].to(accelerator.device)
        losses = clipit_loss(out, target, inputs["text_emb"], lam)
        n = len(target)
        terms.append({k: float(v) * n for k, v in losses.items()} | {"n": n})
        logits.append(out["logits"].float().cpu().numpy())
        labels.append(batch["labels"].numpy())
        keys += batch["keys"]
    wrapper.train()
    parts = gather_object([(np.concatenate(logits) if logits else np.zeros((0, 0)),
                            np.concatenate(labels) if labels else np.zeros(0, np.int64), keys, terms)])
    logits = np.concatenate([p[0] for p in parts if len(p[1])])
    labels = np.concatenate([p[1] for p in parts if len(p[1])])
    keys = [k for p in parts for k in p[2]]
    terms = [t for p in parts for t in p[3]]
    total = sum(t["n"] for t in terms)
    loss_terms = {k: sum(t[k] for t in terms if k in t) / total for k in terms[0] if k != "n"}
    order = np.argsort(keys, kind="stable")  # rank order differs between world sizes; keys do not
    return {"logits": logits[order], "labels": labels[order], "keys": [keys[i] for i in order], **loss_terms}
