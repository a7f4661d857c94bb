"""Seconds per sample of each backbone, text-tower and pairing pass, for the grid cost (clipit/hpc/cost.py).

GPU time = FLOPs / (peak FLOP/s at the pass's precision x MFU), at least the loader's decode time per
sample. FLOPs per sample: the analytic ViT formula below (within 1-2% of torch's FlopCounterMode for the
registered backbones); a LoRA step costs 2 forwards (backward computes input gradients only), a full
fine-tuning step 3. ASSUMED holds the peak, MFU and loader rate used when nothing was measured; a
`make gpu-check` result (the .json written next to its --out Markdown; `clipit grid --dry-run
--throughput FILE`, default runs/gpu-check.json when it exists) replaces them: its measured images/s for
the backbones it ran, its median MFU for the others, its peak and its loader rate.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from clipit.config import ConfigError
from clipit.io import read_json_object

DEFAULT_MEASUREMENTS = Path("runs/gpu-check.json")
# Used when no gpu-check file is given: an H100 SXM / H200 (dense bf16 989 TFLOP/s, fp32 without TF32 67),
# MFU typical of timm ViTs at batch 64-256 (forward 25%, LoRA step 20%), and the shard loader's PNG decode
# rate measured by bench/bench_shard_read.py (~900 samples/s per core) times the profile's CPUs per task.
ASSUMED = {
    "device": "H100/H200-class (assumed)",
    "peak_flops": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "mfu": {"forward": 0.25, "train": 0.20},
    "loader_per_core": 900.0,
}
PASS_FORWARDS = {"forward": 1, "lora": 2, "full": 3}  # forward-equivalents of one sample's pass
# (depth, width, patch, prefix tokens) of the timm architectures in the backbone registry
VIT_ARCHS = {
    "vit_tiny_patch16_224": (12, 192, 16, 1),
    "vit_small_patch16_224": (12, 384, 16, 1),
    "vit_small_patch8_224": (12, 384, 8, 1),
    "vit_base_patch16_224": (12, 768, 16, 1),
    "vit_base_patch8_224": (12, 768, 8, 1),
    "vit_large_patch16_224": (24, 1024, 16, 1),
    "vit_large_patch14_reg4_dinov2": (24, 1024, 14, 5),
}
CONCH_VISION = (12, 768, 16, 1)  # CoCa ViT-B/16 trunk
CONCH_TEXT = (12, 768, 128)  # layers, width, tokens
ASSUMED_REPORTS = 9523  # TCGA-Reports, when the corpus file is not readable at planning time


def vit_flops(
    depth: int, width: int, tokens: int, patch_pixels: int = 0, prefix: int = 0, mlp_ratio: float = 4.0
) -> float:
    """Forward FLOPs of one sample of `tokens` tokens (`prefix` of them class/register tokens): per block
    QKV + out projection (4 n d^2), MLP (2 r n d^2) and the two attention matmuls (2 n^2 d), as
    multiply-adds x 2; plus the patch embedding of the other tokens (3 x patch_pixels inputs each)."""
    per_block = (4 + 2 * mlp_ratio) * tokens * width**2 + 2 * tokens**2 * width
    return 2.0 * (depth * per_block + (tokens - prefix) * 3 * patch_pixels * width)


def backbone_flops(name: str, image_size: int | None = None) -> float:
    from clipit.models.backbones import get_spec

    spec = get_spec(name)
    if spec.arch == "clip":  # clip:<pairing model>: that CLIP's image tower
        return pairing_flops(name.split(":", 1)[1])[0]
    size = image_size or spec.input_size
    if spec.arch == "conch":
        depth, width, patch, prefix = CONCH_VISION
        if "vision_cfg" in spec.kwargs:  # the -tiny variant
            v = spec.kwargs["vision_cfg"]
            depth, width, patch = v["layers"], v["width"], v["patch_size"]
    elif spec.arch in VIT_ARCHS:
        depth, width, patch, prefix = VIT_ARCHS[spec.arch]
        depth, width = spec.kwargs.get("depth", depth), spec.kwargs.get("embed_dim", width)
        patch = spec.kwargs.get("patch_size", patch)
    else:
        return _counted_flops(spec, size)
    return vit_flops(depth, width, (size // patch) ** 2 + prefix, patch * patch, prefix)


def _counted_flops(spec, size: int) -> float:
    """Any other architecture (timm:<name>): torch's FlopCounterMode on a meta-device copy (no memory)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from clipit.models.backbones import create_backbone

    with torch.device("meta"):
        model = create_backbone(spec, size)
        x = torch.zeros(1, 3, size, size)
    with FlopCounterMode(display=False) as counter:
        model(x)
    return float(counter.get_total_flops())


def pairing_flops(name: str) -> tuple[float, float]:
    """(image FLOPs, text FLOPs) per sample of a pairing model's encoders, from its architecture config."""
    if name == "conch":
        depth, width, patch, prefix = CONCH_VISION
        layers, twidth, tokens = CONCH_TEXT
        return vit_flops(depth, width, (448 // patch) ** 2 + prefix, patch * patch, prefix), vit_flops(
            layers, twidth, tokens
        )
    if name == "demo-clip":
        from clipit.pairing.demo_clip import CONFIG_PATH

        cfg = json.loads(CONFIG_PATH.read_text())
    elif "hf-hub:" in name:  # its config would be downloaded while planning: the CONCH-sized assumption
        return pairing_flops("conch")
    else:
        import open_clip

        try:  # a config open_clip does not ship: the CONCH-sized assumption
            cfg = open_clip.get_model_config(name.split(":", 1)[-1]) or {}
        except (OSError, RuntimeError, ValueError):
            cfg = {}
    v, t = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    if not v or not isinstance(v.get("layers"), int):  # unknown encoder: the CONCH-sized assumption
        return pairing_flops("conch")
    patch, size = v.get("patch_size", 16), v.get("image_size", 224)
    return (
        vit_flops(v["layers"], v.get("width", 768), (size // patch) ** 2 + 1, patch * patch, 1),
        vit_flops(t.get("layers", 12), t.get("width", 512), t.get("context_length", 77)),
    )


# ---------------------------------------------------------------------------------------------
# Throughput


@dataclass
class Throughput:
    """Seconds per sample of each pass, from the assumption table or a gpu-check measurement file."""

    source: str
    peak: dict
    mfu: dict
    loader_per_s: float
    measured: dict = field(default_factory=dict)  # key -> {pass kind: samples/s}

    def seconds(self, key: str, flops: float, kind: str, precision: str, images: bool = True) -> float:
        """One sample's pass `kind` (forward | lora | full) through `key` (a backbone name, `tower:<pairing
        model>` or `pairing:<pairing model>`); image passes take at least the loader's decode time."""
        rate = self.measured.get(key, {}).get(kind) if precision != "fp32" else None
        gpu = (
            1.0 / rate
            if rate
            else flops
            * PASS_FORWARDS[kind]
            / (self.peak[precision] * self.mfu["forward" if kind == "forward" else "train"])
        )
        return max(gpu, 1.0 / self.loader_per_s) if images else gpu


# the numbers a gpu-check result holds, each a positive finite rate (MFU a fraction up to 1)
TOP_LEVEL_RATES = ("peak_flops", "loader_samples_per_s", "conch_images_per_s")
ROW_RATES = ("images_per_s", "forward_images_per_s", "mfu", "forward_mfu")


def check_rate(path: Path | str, key: str, value) -> float:
    """`value` of `key` as a positive finite number (MFU at most 1), else one line naming the file and key:
    a cost priced from a zero, negative or garbled rate would be a wrong number, printed with confidence."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf
    if ok and key.endswith("mfu") and value > 1:
        ok = False
    if not ok:
        what = "a fraction in (0, 1]" if key.endswith("mfu") else "a positive finite number"
        raise ConfigError(f"{path}: {key} = {value!r} is not {what}; rerun `make gpu-check`")
    return float(value)


def load_throughput(path: str | Path | None = None, cpus: int = 8) -> Throughput:
    """The measured throughput of `path` (a gpu-check .json, or the .md next to it), else
    runs/gpu-check.json when it exists, else ASSUMED (the loader at `cpus` decoding cores)."""
    candidate = Path(path) if path else DEFAULT_MEASUREMENTS
    candidate = candidate.with_suffix(".json") if candidate.suffix == ".md" else candidate
    if path and not candidate.is_file():
        raise ConfigError(
            f"{candidate}: gpu-check results not found; run `make gpu-check` (it writes the .md "
            "and this .json) or drop --throughput to use the assumed throughput"
        )
    loader = ASSUMED["loader_per_core"] * cpus
    if not candidate.is_file():
        return _assumed(cpus)
    rerun = "rerun `make gpu-check`"
    data = read_json_object(
        candidate, rerun, error=lambda where, why: ConfigError(f"{where}: not a gpu-check result: {why}")
    )
    rows = data.get("train_step", [])
    if not isinstance(rows, list) or not all(isinstance(r, dict) and isinstance(r.get("backbone"), str) for r in rows):
        raise ConfigError(f"{candidate}: train_step is not a list of rows naming their backbone; {rerun}")
    for row in rows:
        check_rate(candidate, f"train_step[{row['backbone']}].images_per_s", row.get("images_per_s"))
    for where, record, keys in [(None, data, TOP_LEVEL_RATES)] + [(r["backbone"], r, ROW_RATES) for r in rows]:
        for key in keys:
            if record.get(key) is not None:
                check_rate(candidate, key if where is None else f"train_step[{where}].{key}", record[key])
    if data.get("dry_run"):  # tiny CPU sizes: they say nothing about a GPU
        if path:
            raise ConfigError(
                f"{candidate}: a gpu-check --dry-run (tiny sizes on CPU), not a measurement; run "
                "`make gpu-check` on a GPU node"
            )
        return _assumed(cpus)
    measured: dict = {}
    tower_s = []  # the text tower's share of a step: 1/(step with tower) - 1/(step without), per backbone
    for row in rows:
        own = measured.setdefault(row["backbone"], {})
        own["tower" if row.get("text_tower") else "lora"] = row["images_per_s"]
        if row.get("forward_images_per_s"):
            own["forward"] = row["forward_images_per_s"]
    for own in measured.values():
        if own.get("tower") and own.get("lora"):
            tower_s.append(max(1 / own["tower"] - 1 / own["lora"], 1e-9))
    if tower_s:
        measured["tower:conch"] = {"lora": 1 / statistics.median(tower_s)}
    if data.get("conch_images_per_s"):
        measured["pairing:conch"] = {"forward": data["conch_images_per_s"]}
    mfu = dict(ASSUMED["mfu"])
    for kind, column in (("train", "mfu"), ("forward", "forward_mfu")):
        values = [r[column] for r in rows if r.get(column) and not r.get("text_tower")]
        if values:
            mfu[kind] = statistics.median(values)
    peak = dict(ASSUMED["peak_flops"])
    peak["bf16"] = peak["fp16"] = float(data.get("peak_flops") or peak["bf16"])
    loader = float(data.get("loader_samples_per_s") or loader)
    return Throughput(
        f"measured: {candidate} ({data.get('device', '?')}; median MFU {mfu['train']:.0%} train, "
        f"{mfu['forward']:.0%} forward for unmeasured backbones; loader {loader:,.0f} samples/s)",
        peak,
        mfu,
        loader,
        measured,
    )


def _assumed(cpus: int) -> Throughput:
    loader = ASSUMED["loader_per_core"] * cpus
    return Throughput(
        f"assumed: {ASSUMED['device']}, dense bf16 {ASSUMED['peak_flops']['bf16'] / 1e12:.0f} TFLOP/s, "
        f"MFU {ASSUMED['mfu']['forward']:.0%} forward / {ASSUMED['mfu']['train']:.0%} train; loader "
        f"{loader:,.0f} samples/s ({cpus} CPUs); `make gpu-check` measures them",
        ASSUMED["peak_flops"],
        ASSUMED["mfu"],
        loader,
    )
