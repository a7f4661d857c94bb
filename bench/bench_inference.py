"""CLIP-IT inference (LoRA merged, as `clipit export` writes it) vs the unimodal model, in one process.

Variants, each a no_grad forward of one batch in eval mode:
  unimodal          backbone + head W_v
  clipit-merged     backbone (LoRA folded into the weights) + W_v + P + H_t + F: the exported model
  clipit-unmerged   the same with the LoRA adapters still separate (what evaluation during training runs)
Goal: clipit-merged / unimodal <= 1.02. Also printed: the parameter overhead and the FLOPs of
P, H_t and F next to the backbone's (torch.utils.flop_counter, batch 1).

    .venv/bin/python bench/bench_inference.py             # ViT-S/16, 224 px, batch 32, CPU
"""

from __future__ import annotations

import torch
from common import count, interleaved, make, median, parser, setup
from torch.utils.flop_counter import FlopCounterMode

from clipit.evaluation.export import merge_lora


def flops(model, x) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


def main() -> None:
    args = parser(__doc__).parse_args()
    setup(args)
    unimodal = make(args, "unimodal", "frozen", warm_head=False).eval()
    unmerged = make(args, "clipit", "lora", warm_head=True).eval()
    merged = make(args, "clipit", "lora", warm_head=True)
    with torch.no_grad():  # trained adapters are not zero: give B random values so merging changes weights
        for model in (unmerged, merged):
            torch.manual_seed(1)
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
    merged = merge_lora(merged).eval()
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size).to(args.device)
    with torch.no_grad():
        torch.testing.assert_close(merged(x[:4])["logits"], unmerged(x[:4])["logits"], atol=1e-4, rtol=1e-4)

    def fwd(model):
        def run():
            with torch.no_grad():
                model(x)

        return run

    variants = {"unimodal": unimodal, "clipit-merged": merged, "clipit-unmerged": unmerged}
    times = interleaved({k: fwd(m) for k, m in variants.items()}, args.repeats, args.warmup, args.device, args.clock)
    base_params = count(unimodal)
    print("| variant | parameters | forward (median s) | images/s | min..max s |")
    print("|---|---|---|---|---|")
    for name, ts in times.items():
        print(
            f"| {name} | {count(variants[name]):,} | {median(ts):.4f} | {args.batch_size / median(ts):.1f} "
            f"| {min(ts):.4f}..{max(ts):.4f} |"
        )
    one = x[:1]
    f_uni, f_clip = flops(unimodal, one), flops(merged, one)
    extra = count(merged) - base_params
    for label, stat in (("min", min), ("median", median)):  # min: least disturbed by other processes
        base = stat(times["unimodal"])
        print(f"\n[{label}] clipit-merged / unimodal   = {stat(times['clipit-merged']) / base:.3f}  (goal <= 1.02)")
        print(f"[{label}] clipit-unmerged / unimodal = {stat(times['clipit-unmerged']) / base:.3f}")
    print()
    print(f"parameter overhead (P, H_t, F): +{extra:,} ({100 * extra / base_params:.2f}% of {base_params:,})")
    print(
        f"FLOPs per image: unimodal {f_uni / 1e9:.3f} G, clipit-merged {f_clip / 1e9:.3f} G "
        f"(+{100 * (f_clip - f_uni) / f_uni:.3f}%)"
    )


if __name__ == "__main__":
    main()
