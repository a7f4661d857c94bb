"""Device-side input preprocessing of every model: uint8 NHWC tiles -> normalised float NCHW at the
backbone's input size, with the 8 dihedral symmetries as training augmentation (histology has no
canonical orientation). Images stay uint8 until they reach the device."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class DevicePreprocess(torch.nn.Module):
    """uint8 NHWC -> normalised float NCHW at the model's input size, with optional flips/rot90."""

    def __init__(self, size: int, mean, std):
        super().__init__()
        self.size = size
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor, augment: bool = False, generator: torch.Generator | None = None):
        x = images.permute(0, 3, 1, 2).float().div_(255)
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        if augment:
            x = random_dihedral(x, generator)
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
