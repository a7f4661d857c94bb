"""CLIP-IT train step vs unimodal train steps with the same backbone, measured in one process.

Three variants, each a full optimiser step (forward, loss, backward, grad-norm clip 0.5, Adam) on
the same random batch of preprocessed images (+ the cached report embeddings for CLIP-IT):
  probe         unimodal linear probe: frozen backbone under no_grad, head trained (the paper's
                unimodal model, Stage 0)
  lora-vision   unimodal with LoRA on the backbone, fresh head trained in full: the same
                adapted backbone as CLIP-IT, without P, H_t, F and the distillation term
  clipit        LoRA on backbone + warm-started head, P, H_t, F trained; CE + 1.0 * (1 - cos(P e, t))
                against a cached 512-d text embedding (no text encoder in the loop)
  clipit-tower  (--text-tower conch) CLIP-IT with the paper's default text side: CONCH's text tower
                (conch_ViT-B-16 config, random weights: 12 layers, width 768) with LoRA encodes a full
                127-token report per sample in the same step (text_encoder: tower); every sample has
                its own report here, the worst case (the tower encodes each distinct report once)
The goal for the cost of the text side is clipit / lora-vision <= 1.05. clipit / probe is also
printed: it measures LoRA fine-tuning itself (backward through the whole backbone), not CLIP-IT.

    .venv/bin/python bench/bench_train_step.py            # ViT-S/16, 224 px, batch 32, CPU
    .venv/bin/python bench/bench_train_step.py --text-tower conch
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from common import count, interleaved, make, median, parser, setup

from clipit.models.clipit import clipit_loss


def step_fn(model, images, labels, text, tokens=None):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-4, weight_decay=1e-4)
    extra = {"tokens": tokens} if tokens is not None else {}

    def step():
        out = model(images, text, **extra)
        loss = clipit_loss(out, labels, text, lam=1.0)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.5)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def conch_text_tower():
    """CONCH's text tower with the packaged architecture and random weights, and a batch-sized report."""
    from clipit.pairing import encoders as pairing_models
    from clipit.pairing.text_tower import text_tower_from

    coca = pairing_models._import_conch().CoCa(**pairing_models.conch_config())
    pairing = pairing_models.ConchPairingModel("conch", coca, None, pairing_models.conch_tokenizer(), {})
    return text_tower_from(pairing, copy=False)


def main() -> None:
    p = parser(__doc__)
    p.add_argument(
        "--text-tower",
        choices=["none", "conch"],
        default="none",
        help="conch: also time CLIP-IT with CONCH's text tower + LoRA in the step (needs conch-fork)",
    )
    args = p.parse_args()
    setup(args)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=g).to(args.device)
    labels = torch.randint(0, args.classes, (args.batch_size,), generator=g).to(args.device)
    text = F.normalize(torch.randn(args.batch_size, args.text_dim, generator=g), dim=1).to(args.device)
    models = {
        "probe": make(args, "unimodal", "frozen", warm_head=False),
        "lora-vision": make(args, "unimodal", "lora", warm_head=False),
        "clipit": make(args, "clipit", "lora", warm_head=True),
    }
    tokens = {}
    if args.text_tower == "conch":
        tower = conch_text_tower()
        report = "Invasive ductal carcinoma of the left breast, grade 2, with desmoplastic stroma. " * 20
        # a distinct full-length report per sample: the worst case (shared reports are encoded once)
        tokens["clipit-tower"] = tower.tokenize([f"Case {i}. {report}" for i in range(args.batch_size)]).to(args.device)
        models["clipit-tower"] = make(args, "clipit", "lora", warm_head=True, text_tower=tower)
    for m in models.values():
        m.train()
    times = interleaved(
        {k: step_fn(m, images, labels, text, tokens.get(k)) for k, m in models.items()},
        args.repeats,
        args.warmup,
        args.device,
        args.clock,
    )
    print("| variant | trainable params | step (median s) | images/s | min..max s |")
    print("|---|---|---|---|---|")
    for name, ts in times.items():
        print(
            f"| {name} | {count(models[name], True):,} | {median(ts):.3f} | {args.batch_size / median(ts):.1f} "
            f"| {min(ts):.3f}..{max(ts):.3f} |"
        )
    for label, stat in (("min", min), ("median", median)):  # min: least disturbed by other processes
        clip, lora, probe = (stat(times[k]) for k in ("clipit", "lora-vision", "probe"))
        print(
            f"\n[{label}] clipit / lora-vision = {clip / lora:.3f}  (goal <= 1.05: the text side's cost, cached embeddings)"
        )
        print(f"[{label}] clipit / probe       = {clip / probe:.3f}  (LoRA fine-tuning vs a frozen linear probe)")
        if "clipit-tower" in times:
            print(
                f"[{label}] clipit-tower / clipit = {stat(times['clipit-tower']) / clip:.3f}  (CONCH text tower + "
                "LoRA in the step vs cached report embeddings)"
            )


if __name__ == "__main__":
    main()
