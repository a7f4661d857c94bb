"""CLIP-IT train step vs unimodal train steps with the same backbone, measured in one process.

Three variants, each a full optimiser step (forward, loss, backward, grad-norm clip 0.5, Adam) on
the same random batch of preprocessed images (+ the cached report embeddings for CLIP-IT):
  probe         unimodal linear probe: frozen backbone under no_grad, head trained (the paper's
                unimodal model, Stage 0)
  lora-vision   unimodal with LoRA on the backbone, fresh head trained in full: the same
                adapted backbone as CLIP-IT, without P, H_t, F and the distillation term
  clipit        LoRA on backbone + warm-started head, P, H_t, F trained; CE + 1.0 * (1 - cos(P e, t))
                against a cached 512-d text embedding (no text encoder in the loop)
The goal for the cost of the text side is clipit / lora-vision <= 1.05. clipit / probe is also
printed: it measures LoRA fine-tuning itself (backward through the whole backbone), not CLIP-IT.

    .venv/bin/python bench/bench_train_step.py            # ViT-S/16, 224 px, batch 32, CPU
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from common import count, interleaved, make, median, parser, setup

from clipit.models.clipit import clipit_loss


def step_fn(model, images, labels, text):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-4, weight_decay=1e-4)

    def step():
        out = model(images, text)
        loss = clipit_loss(out, labels, text, lam=1.0)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.5)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    args = parser(__doc__).parse_args()
    setup(args)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=g).to(args.device)
    labels = torch.randint(0, args.classes, (args.batch_size,), generator=g).to(args.device)
    text = F.normalize(torch.randn(args.batch_size, args.text_dim, generator=g), dim=1).to(args.device)
    models = {"probe": make(args, "unimodal", "frozen", warm_head=False),
              "lora-vision": make(args, "unimodal", "lora", warm_head=False),
              "clipit": make(args, "clipit", "lora", warm_head=True)}
    for m in models.values():
        m.train()
    times = interleaved({k: step_fn(m, images, labels, text) for k, m in models.items()}, args.repeats, args.warmup,
                        args.device, args.clock)
    print("| variant | trainable params | step (median s) | images/s | min..max s |")
    print("|---|---|---|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {count(models[name], True):,} | {median(ts):.3f} | {args.batch_size / median(ts):.1f} "
              f"| {min(ts):.3f}..{max(ts):.3f} |")
    for label, stat in (("min", min), ("median", median)):  # min: least disturbed by other processes
        clip, lora, probe = (stat(times[k]) for k in ("clipit", "lora-vision", "probe"))
        print(f"\n[{label}] clipit / lora-vision = {clip / lora:.3f}  (goal <= 1.05: the text side's cost, cached embeddings)")
        print(f"[{label}] clipit / probe       = {clip / probe:.3f}  (LoRA fine-tuning vs a frozen linear probe)")


if __name__ == "__main__":
    main()
