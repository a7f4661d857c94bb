"""A tiny open_clip CLIP standing in for CONCH: trained in ~1 min on CPU on a paired synthetic
image-caption set (clipit.data.demo_text.make_paired_set), then used frozen to pair images with reports.

The architecture lives in the package file `clipit-demo-clip.json`; open_clip names registered configs by
file stem, so the model name is DEMO_CLIP_NAME. 512-d joint space, like CONCH.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from clipit.io import atomic_path, atomic_write_json, sha256_file

DEMO_CLIP_NAME = "clipit-demo-clip"
CONFIG_PATH = Path(__file__).with_name(f"{DEMO_CLIP_NAME}.json")
CHECKPOINT_NAME = "model.safetensors"
# open_clip's OpenAI CLIP normalisation (what its preprocess applies by default).
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def register_demo_clip() -> str:
    """Make open_clip aware of the demo config (idempotent); returns the model name."""
    import open_clip

    if DEMO_CLIP_NAME not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_PATH)
    return DEMO_CLIP_NAME


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 N x H x W x 3 -> normalised float N x 3 x H x W (same as open_clip's eval preprocess at 64 px)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255)
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def _forward_trimmed(model, images: torch.Tensor, text: torch.Tensor):
    """model(images, text) over only the non-pad prefix of the tokens: captions use ~20 of the 77 positions,
    and with the causal mask + EOT (argmax) pooling the result is identical, at a fraction of the cost.
    functional_call swaps in sliced views of the real parameters, so gradients still reach them."""
    from torch.func import functional_call

    L = int((text != 0).sum(1).max())
    over = {"positional_embedding": model.positional_embedding[:L], "attn_mask": model.attn_mask[:L, :L]}
    return functional_call(model, over, (images, text[:, :L]))


def train_demo_clip(
    images: np.ndarray,
    captions: list[str],
    out_dir: Path,
    seconds: float = 60,
    seed: int = 0,
    batch_size: int = 64,
    lr: float = 2e-3,
    max_steps: int | None = None,
) -> Path:
    """Contrastive training (open_clip ClipLoss, AdamW, warmup + cosine) for at most `seconds` wall time
    and at most `max_steps` steps (set it for a bit-reproducible run; wall time alone is machine-dependent).
    Writes out_dir/model.safetensors (atomic) then out_dir/identity.json; skips if both exist."""
    import open_clip
    from safetensors.torch import save_file

    from clipit.progress import Progress

    out_dir = Path(out_dir)
    ckpt, ident = out_dir / CHECKPOINT_NAME, out_dir / "identity.json"
    if ckpt.is_file() and ident.is_file():
        return ckpt
    if len(images) != len(captions) or len(images) < 2:
        raise ValueError(f"need >= 2 paired images and captions, got {len(images)} images, {len(captions)} captions")
    out_dir.mkdir(parents=True, exist_ok=True)
    name = register_demo_clip()
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None)
    tokenizer = open_clip.get_tokenizer(name)
    x_all, t_all = _to_tensor(images), tokenizer(list(captions))
    n = len(images)
    batch_size = min(batch_size, n)
    loss_fn = open_clip.loss.ClipLoss()
    # No weight decay on gains/biases/embeddings/logit_scale (standard CLIP recipe).
    decay = [p for nm, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in nm]
    rest = [p for nm, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in nm)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    gen = torch.Generator().manual_seed(seed)
    warmup, step, losses = 20, 0, []
    model.train()
    start = time.monotonic()
    bar = Progress(total=max_steps, desc="demo CLIP", unit="step")
    perm, pos = torch.randperm(n, generator=gen), 0
    while True:
        elapsed = time.monotonic() - start
        progress = max(elapsed / seconds, step / max_steps if max_steps else 0.0)
        if progress >= 1.0:
            break
        # Schedule on progress (time or steps), so a short budget still ends at low lr.
        scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * progress))
        for g in opt.param_groups:
            g["lr"] = lr * scale
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos : pos + batch_size]
        pos += batch_size
        x = x_all[idx]
        # Light augmentation: H&E is orientation-free, so random 90-degree rotations and flips.
        k = int(torch.randint(4, (1,), generator=gen))
        x = torch.rot90(x, k, (2, 3))
        if torch.rand(1, generator=gen).item() < 0.5:
            x = x.flip(3)
        img_f, txt_f, logit_scale = _forward_trimmed(model, x, t_all[idx])
        loss = loss_fn(img_f, txt_f, logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():  # CLIP clamps the temperature at 100
            model.logit_scale.clamp_(0, math.log(100))
        step += 1
        losses.append(loss.item())
        bar.update(1, info=f"loss {losses[-1]:.3f}")
    bar.close()
    train_s = time.monotonic() - start
    model.eval()
    with atomic_path(ckpt) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    identity = {
        "name": name,
        "config": json.loads(CONFIG_PATH.read_text()),
        "sha256": sha256_file(ckpt),
        "steps": step,
        "train_seconds": round(train_s, 2),
        "seed": seed,
        "batch_size": batch_size,
        "lr": lr,
        "n_pairs": n,
        "final_loss": float(np.mean(losses[-10:])) if losses else None,
        "open_clip": open_clip.__version__,
    }
    atomic_write_json(ident, identity, indent=1)
    return ckpt


def load_demo_clip(checkpoint: Path):
    """(model in eval mode, eval preprocess for PIL images, tokenizer) for a train_demo_clip checkpoint."""
    import open_clip

    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        checkpoint = checkpoint / CHECKPOINT_NAME
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{checkpoint}: demo CLIP checkpoint not found; train it with train_demo_clip()")
    name = register_demo_clip()
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=str(checkpoint))
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(name)
