"""Small building blocks shared by priors, decoders and guides."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F


def mlp(in_dim: int, hidden: Sequence[int], out_dim: int) -> nn.Sequential:
    """A ReLU multilayer perceptron ``in_dim -> hidden... -> out_dim`` (no activation on the output)."""
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width), nn.ReLU()]
        in_dim = width
    layers.append(nn.Linear(in_dim, out_dim))
    return nn.Sequential(*layers)


class NormalHead(nn.Module):
    """Maps an input to the ``(loc, scale)`` of a diagonal Gaussian through one MLP with two outputs.

    The scale is ``softplus(raw) + min_scale``: positive, smooth, and bounded away from zero so that the
    log-density of a draw cannot overflow early in training.
    """

    def __init__(self, in_dim: int, hidden: Sequence[int], out_dim: int, min_scale: float = 1e-3):
        super().__init__()
        self.net = mlp(in_dim, hidden, 2 * out_dim)
        self.min_scale = min_scale

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc, raw = self.net(inputs).chunk(2, dim=-1)
        return loc, F.softplus(raw) + self.min_scale
