"""Device-side input preprocessing of every model: uint8 NHWC tiles -> normalised float NCHW at the
backbone's input size, with training augmentation (methods.<m>.augment_policy): `dihedral`, the 8
symmetries of a square tile (histology has no canonical orientation), or `flips_jitter`, the
reference's Feb-2025 PCAM loader (h/v flips p=0.5 + torchvision ColorJitter(0.5, 0.5, 0.5, 0.05)).
Images stay uint8 until they reach the device."""

from __future__ import annotations

import torch
import torch.nn.functional as F

AUGMENT_POLICIES = ("dihedral", "flips_jitter")
JITTER = (0.5, 0.5, 0.5, 0.05)  # brightness, contrast, saturation, hue of the reference's ColorJitter


class DevicePreprocess(torch.nn.Module):
    """uint8 NHWC -> normalised float NCHW at the model's input size, with an optional augmentation."""

    def __init__(self, size: int, mean, std):
        super().__init__()
        self.size = size
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor, augment: str | None = None, generator: torch.Generator | None = None):
        """`augment`: None (evaluation) or a policy of AUGMENT_POLICIES."""
        x = images.permute(0, 3, 1, 2).float().div_(255)
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        if augment == "dihedral":
            x = random_dihedral(x, generator)
        elif augment == "flips_jitter":
            x = color_jitter(random_flips(x, generator), generator)
        elif augment is not None:
            raise ValueError(f"augment must be None or one of {AUGMENT_POLICIES}, got {augment!r}")
        return (x - self.mean) / self.std


def random_dihedral(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample random flip and 90-degree rotation (the 8 symmetries of a square tile)."""
    codes = torch.randint(0, 8, (x.shape[0],), generator=generator).to(x.device)
    flipped = torch.where((codes % 2 == 1).view(-1, 1, 1, 1), x.flip(-1), x)
    out = flipped.clone()
    for k in (1, 2, 3):
        mask = codes // 2 == k
        if mask.any():
            out[mask] = torch.rot90(flipped[mask], k, dims=(-2, -1))
    return out


def random_flips(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """RandomHorizontalFlip(0.5) then RandomVerticalFlip(0.5), drawn per sample."""
    draws = torch.rand((x.shape[0], 2), generator=generator).to(x.device) < 0.5
    x = torch.where(draws[:, 0].view(-1, 1, 1, 1), x.flip(-1), x)
    return torch.where(draws[:, 1].view(-1, 1, 1, 1), x.flip(-2), x)


def color_jitter(x: torch.Tensor, generator: torch.Generator | None = None, jitter=JITTER) -> torch.Tensor:
    """torchvision's ColorJitter per sample on float images in [0, 1]: the four adjustments in a random order,
    brightness/contrast/saturation factors uniform in [1 - b, 1 + b], hue shift uniform in [-h, h]."""
    from torchvision.transforms.v2 import functional as TF

    b, c, s, h = jitter
    n = x.shape[0]
    order = torch.argsort(torch.rand((n, 4), generator=generator), dim=1)
    factors = torch.rand((n, 4), generator=generator)
    low = torch.tensor([1 - b, 1 - c, 1 - s, -h])
    factors = low + factors * torch.tensor([2 * b, 2 * c, 2 * s, 2 * h])
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    out = []
    for i in range(n):
        image = x[i]
        for op in order[i].tolist():
            image = ops[op](image, float(factors[i, op]))
        out.append(image)
    return torch.stack(out)
