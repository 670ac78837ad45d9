"""The conditional model of Sohn et al. (2015): p(y, z | x) = p(z | x) p(y | x, z).

``prior`` is either the prior network p(z|x) (``cvae``) or N(0, I) (``cvae-independent-prior``,
Sohn's relaxation p(z|x) = p(z)); the generation network always sees x as well as z.
With ``y=None`` the model samples y: the structured prediction for input x.
"""

from __future__ import annotations

import pyro
import torch
from torch import nn

from vae_priors.models.plate import data_plate


class ConditionalVAE(nn.Module):
    """p(y, z | x) = p(z | x) p(y | x, z), observed site ``"y"``."""

    def __init__(self, prior: nn.Module, decoder: nn.Module, likelihood: nn.Module):
        super().__init__()
        self.prior = prior
        self.decoder = decoder
        self.likelihood = likelihood

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        with data_plate(x.shape[0], x.device):
            z = pyro.sample("z", self.prior(x))
            return pyro.sample("y", self.likelihood(self.decoder(x, z)), obs=y)
