"""Small building blocks shared by priors, decoders and guides.

Two kinds of hidden layer (``layer`` argument):

* ``"relu"``: ``Linear`` then ReLU, torch's default initialization;
* ``"gated"``: the gated dense layer of the VampPrior reference code (Tomczak & Welling 2018, after Dauphin et al.
  2017), h = (W x + b) * sigmoid(V x + c), with every linear map He-initialized (weights ~ N(0, 2 / fan_in)) as
  there. With ``"gated"`` a ``NormalHead`` also follows the reference: log sigma^2 = Hardtanh(-6, 2)(linear), so
  sigma is in [0.05, 2.72].
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

LAYERS = ("relu", "gated")


class GatedDense(nn.Module):
    """h = (W x + b) * sigmoid(V x + c): both maps computed by one ``Linear`` of twice the width."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear = nn.Linear(in_dim, 2 * out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.linear(x).chunk(2, dim=-1)
        return value * torch.sigmoid(gate)


def he_init(module: nn.Module) -> None:
    """Weights of every ``Linear`` in ``module`` ~ N(0, 2 / fan_in) (the reference code's ``he_init``)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / m.in_features))


def _check_layer(layer: str) -> None:
    if layer not in LAYERS:
        raise ValueError(f"unknown hidden layer {layer!r}; choose one of {', '.join(LAYERS)}")


def mlp(in_dim: int, hidden: Sequence[int], out_dim: int, layer: str = "relu") -> nn.Sequential:
    """A multilayer perceptron ``in_dim -> hidden... -> out_dim`` of ``layer`` hidden layers (no output activation)."""
    _check_layer(layer)
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width), nn.ReLU()] if layer == "relu" else [GatedDense(in_dim, width)]
        in_dim = width
    layers.append(nn.Linear(in_dim, out_dim))
    net = nn.Sequential(*layers)
    if layer == "gated":
        he_init(net)
    return net


class NormalHead(nn.Module):
    """Maps an input to the ``(loc, scale)`` of a diagonal Gaussian through one MLP with two outputs.

    ``layer="relu"``: the scale is ``softplus(raw) + min_scale``: positive, smooth, and bounded away from zero so
    that the log-density of a draw cannot overflow early in training. ``layer="gated"``: the reference code's
    ``exp(Hardtanh(-6, 2)(raw) / 2)``.
    """

    def __init__(self, in_dim: int, hidden: Sequence[int], out_dim: int, min_scale: float = 1e-3,
                 layer: str = "relu"):
        super().__init__()
        self.net = mlp(in_dim, hidden, 2 * out_dim, layer)
        self.min_scale = min_scale
        self.layer = layer

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc, raw = self.net(inputs).chunk(2, dim=-1)
        if self.layer == "gated":
            return loc, torch.exp(0.5 * F.hardtanh(raw, -6.0, 2.0))
        return loc, F.softplus(raw) + self.min_scale
