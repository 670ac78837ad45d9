"""Non-amortized guide: free parameters (mu_n, sigma_n) for every training point.

With the same decoder as an amortized guide it measures the amortization gap (Cremer et al. 2018):
the difference between the best per-point ELBO and what the encoder achieves. It has no parameters
for unseen points, so evaluation fits a fresh ``LocalNormalGuide`` on the test points with the model
frozen (see ``vae_priors.experiments.evaluation.importance``).
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.nn import functional as F

from vae_priors.models.plate import data_plate


class LocalNormalGuide(nn.Module):
    """q(z | x_n) = N(mu_n, diag sigma_n^2), parameters indexed by the data plate's subsample indices."""

    amortized = False

    def __init__(self, num_points: int, latent_dim: int, init_scale: float = 0.1):
        super().__init__()
        self.num_points = num_points
        self.latent_dim = latent_dim
        self.loc = nn.Parameter(torch.zeros(num_points, latent_dim))
        raw = float(torch.tensor(init_scale).expm1().log())
        self.raw_scale = nn.Parameter(torch.full((num_points, latent_dim), raw))

    def encode_index(self, index: torch.Tensor) -> dist.Distribution:
        return dist.Normal(self.loc[index], F.softplus(self.raw_scale[index]) + 1e-3).to_event(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.num_points:
            raise ValueError(f"this guide has parameters for {self.num_points} points, got a batch of {x.shape[0]}")
        with data_plate(x.shape[0], x.device) as index:
            return pyro.sample("z", self.encode_index(index))

    def for_new_points(self, num_points: int) -> LocalNormalGuide:
        """A fresh guide of the same kind for ``num_points`` unseen points (to be fitted with the model frozen)."""
        return LocalNormalGuide(num_points, self.latent_dim).to(self.loc.device)
