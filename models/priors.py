"""Gaussian priors over the latent z: the independent p(z) = N(0, I) and the x-conditioned p(z|x).

A prior is an ``nn.Module`` whose call returns the distribution at the model's ``"z"`` site for a batch:
batch shape ``(B,)``, event shape ``(latent_dim,)``. Unconditional priors take the batch's data-point
indices (so priors over training points can leave a point's own component out); conditional priors take
the conditioning input x. Mixture priors over training points live in ``models/mixture_priors.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyro.distributions as dist
import torch
from torch import nn

from vae_priors.models.networks import NormalHead


class StandardNormalPrior(nn.Module):
    """p(z) = N(0, I), the same for every data point; called with anything whose first axis is the batch."""

    def __init__(self, latent_dim: int):
        super().__init__()
        self.latent_dim = latent_dim
        self.register_buffer("loc", torch.zeros(latent_dim))
        self.register_buffer("scale", torch.ones(latent_dim))

    def forward(self, batch: torch.Tensor) -> dist.Distribution:
        shape = (batch.shape[0], self.latent_dim)
        return dist.Normal(self.loc.expand(shape), self.scale.expand(shape)).to_event(1)


class ConditionalNormalPrior(nn.Module):
    """Prior network p(z|x) = N(mu(x), diag sigma(x)^2) (Sohn et al. 2015, the CVAE's conditional prior)."""

    def __init__(self, x_dim: int, hidden: Sequence[int], latent_dim: int, layer: str = "relu"):
        super().__init__()
        self.latent_dim = latent_dim
        self.net = NormalHead(x_dim, hidden, latent_dim, layer=layer)

    def forward(self, x: torch.Tensor) -> dist.Distribution:
        loc, scale = self.net(x)
        return dist.Normal(loc, scale).to_event(1)
