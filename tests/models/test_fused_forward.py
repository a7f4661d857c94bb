"""CLIP-IT's fused forward F([W_v e ; H_t(P e)]) (method.md Eq. 3-4) against a hand computation."""

import torch
from torch import nn

from clipit.models.clipit import ClipItModel


class Identity(nn.Module):
    """A 'backbone' whose features are its input: e is what the test writes down."""

    num_features = 2

    def forward(self, x):
        return x


def set_linear(layer: nn.Linear, weight, bias) -> None:
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight, dtype=torch.float32))
        layer.bias.copy_(torch.tensor(bias, dtype=torch.float32))


def test_fused_forward_matches_hand_computation():
    model = ClipItModel(Identity(), num_classes=2, text_dim=2, kd_layers=1)
    set_linear(model.head, [[1, 0], [0, 2]], [0, 1])  # W_v
    set_linear(model.proj, [[1, 1], [0, -1]], [0, 0])  # P
    set_linear(model.text_head[0], [[1, 0], [0, 1]], [0, 0])  # H_t layer 1, then LeakyReLU(0.1)
    set_linear(model.text_head[2], [[2, 0], [1, 1]], [0, 0])  # H_t layer 2
    set_linear(model.fuse, [[1, 0, 1, 0], [0, 1, 0, -1]], [0, 0])  # F over [vision logits ; text logits]
    e = torch.tensor([[3.0, 10.0]])
    # by hand: W_v e = [3, 21]; P e = [13, -10]; layer 1 = [13, -10] -> LeakyReLU -> [13, -1];
    # layer 2 = [26, 12]; F([3, 21, 26, 12]) = [3 + 26, 21 - 12] = [29, 9]
    out = model(e)
    torch.testing.assert_close(out["vision_logits"], torch.tensor([[3.0, 21.0]]))
    torch.testing.assert_close(out["proj"], torch.tensor([[13.0, -10.0]]))
    torch.testing.assert_close(out["text_logits"], torch.tensor([[26.0, 12.0]]))
    torch.testing.assert_close(out["logits"], torch.tensor([[29.0, 9.0]]))
    assert out["logits"].argmax(1).item() == 0  # F overrules the vision head's choice (class 1)
