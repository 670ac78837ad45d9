"""Amortized diagonal-Gaussian guides: one encoder network maps each input to its q(z|.)."""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from vae_priors.models.networks import NormalHead
from vae_priors.models.plate import data_plate


class AmortizedNormalGuide(nn.Module):
    """q(z|x) = N(mu(x), diag sigma(x)^2), an MLP encoder shared by all data points.

    ``encode(x)`` returns the Gaussian itself (no Pyro site): mixture priors over training points and the
    aggregated-posterior diagnostics reuse it.
    """

    amortized = True

    def __init__(self, x_dim: int, hidden: Sequence[int], latent_dim: int, layer: str = "relu"):
        super().__init__()
        self.latent_dim = latent_dim
        self.net = NormalHead(x_dim, hidden, latent_dim, layer=layer)

    def encode(self, x: torch.Tensor) -> dist.Distribution:
        loc, scale = self.net(x)
        return dist.Normal(loc, scale).to_event(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with data_plate(x.shape[0], x.device):
            return pyro.sample("z", self.encode(x))


class ConditionalAmortizedNormalGuide(nn.Module):
    """Recognition network q(z|x,y) = N(mu(x,y), diag sigma(x,y)^2) of the CVAE (Sohn et al. 2015)."""

    amortized = True

    def __init__(self, x_dim: int, y_dim: int, hidden: Sequence[int], latent_dim: int, layer: str = "relu"):
        super().__init__()
        self.latent_dim = latent_dim
        self.net = NormalHead(x_dim + y_dim, hidden, latent_dim, layer=layer)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if y is None:
            raise ValueError("q(z|x,y) needs y; to predict y from x, sample the model without a guide")
        loc, scale = self.net(torch.cat([x, y], dim=-1))
        with data_plate(x.shape[0], x.device):
            return pyro.sample("z", dist.Normal(loc, scale).to_event(1))


class PriorNetGuide(nn.Module):
    """Uses a conditional model's own prior network p(z|x) as the proposal: the GSNN of Sohn et al.

    Paired with that model, the ELBO's KL term is exactly zero and the objective is
    E_{p(z|x)}[log p(y|x,z)], the GSNN objective (section 4.1 of Sohn et al. 2015).
    """

    amortized = True

    def __init__(self, prior: nn.Module):
        super().__init__()
        self.prior = prior  # shared with the model, not a copy

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        with data_plate(x.shape[0], x.device):
            return pyro.sample("z", self.prior(x))
