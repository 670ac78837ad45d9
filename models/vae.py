"""The unconditional latent-variable model p(x, z) = p(z) p(x|z) shared by every VAE variant.

Variants differ only in the prior module (``N(0, I)``, a VampPrior, an exemplar prior ...) and in the
guide they are paired with; the model itself is always::

    with plate("data", N, subsample=batch):
        z ~ prior(batch)            # the site "z" IS the prior for these data points
        x ~ likelihood(decoder(z))  # observed
"""

from __future__ import annotations

import pyro
import torch
from torch import nn

from vae_priors.models.plate import data_plate


class VAE(nn.Module):
    """p(x, z) = p(z) p(x | z); ``prior(index)`` returns the ``"z"`` distribution for the batch."""

    def __init__(self, prior: nn.Module, decoder: nn.Module, likelihood: nn.Module):
        super().__init__()
        self.prior = prior
        self.decoder = decoder
        self.likelihood = likelihood

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with data_plate(x.shape[0], x.device) as index:
            z = pyro.sample("z", self.prior(index))
            return pyro.sample("x", self.likelihood(self.decoder(z)), obs=x)
