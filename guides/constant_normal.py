"""The control for a common misconception: a guide that ignores x.

q(z|x) = q(z) = N(mu, diag sigma^2) with mu and sigma learned constants. Every data point gets the same
posterior, so the mutual information I_q(x; z) is exactly zero and the decoder cannot use z.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.nn import functional as F

from vae_priors.models.plate import data_plate


class ConstantNormalGuide(nn.Module):
    """q(z) = N(mu, diag sigma^2), the same for every data point."""

    amortized = True  # trivially: it needs no per-point parameters for unseen points

    def __init__(self, latent_dim: int):
        super().__init__()
        self.latent_dim = latent_dim
        self.loc = nn.Parameter(torch.zeros(latent_dim))
        self.raw_scale = nn.Parameter(torch.zeros(latent_dim))

    def encode(self, x: torch.Tensor) -> dist.Distribution:
        shape = (x.shape[0], self.latent_dim)
        scale = F.softplus(self.raw_scale) + 1e-3
        return dist.Normal(self.loc.expand(shape), scale.expand(shape)).to_event(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with data_plate(x.shape[0], x.device):
            return pyro.sample("z", self.encode(x))
