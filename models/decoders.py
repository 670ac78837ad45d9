"""Decoders: networks from the latent z (and, for conditional models, the input x) to the parameters
of the likelihood p(x|z) or p(y|x,z)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vae_priors.models.networks import mlp


class MLPDecoder(nn.Module):
    """z -> likelihood parameters (Bernoulli logits or Gaussian means) of an ``out_dim`` vector."""

    def __init__(self, latent_dim: int, hidden: Sequence[int], out_dim: int, layer: str = "relu"):
        super().__init__()
        self.net = mlp(latent_dim, hidden, out_dim, layer)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class ConditionalMLPDecoder(nn.Module):
    """Generation network (x, z) -> parameters of p(y|x,z).

    It takes BOTH x and z: with an independent prior p(z), a decoder of z alone would make y
    independent of x (the trap in Pyro's CVAE example).
    """

    def __init__(self, x_dim: int, latent_dim: int, hidden: Sequence[int], y_dim: int, layer: str = "relu"):
        super().__init__()
        self.net = mlp(x_dim + latent_dim, hidden, y_dim, layer)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        x = x.expand(z.shape[:-1] + x.shape[-1:])  # z may carry extra particle dims on the left
        return self.net(torch.cat([x, z], dim=-1))
