"""Observation models p(x|z): a decoder output turned into a distribution over one data vector.

``BernoulliLikelihood`` is for data in [0, 1]. On binary data it is the Bernoulli likelihood; on grey
values it is the usual cross-entropy, which is not a normalized density, so log-likelihoods on grey data
are not comparable with published binary numbers (the embedded digits are binarized by default for that
reason). ``GaussianLikelihood`` learns one scale per dimension.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn
from torch.nn import functional as F


class BernoulliLikelihood(nn.Module):
    """p(x|z) = prod_d Bernoulli(x_d | sigmoid(logits_d))."""

    support = (0.0, 1.0)

    def forward(self, logits: torch.Tensor) -> dist.Distribution:
        # validate_args=False: grey values in [0, 1] are allowed (cross-entropy); the data layer
        # rejects values outside [0, 1] with a clear error before training starts.
        return dist.Bernoulli(logits=logits, validate_args=False).to_event(1)


class GaussianLikelihood(nn.Module):
    """p(x|z) = prod_d Normal(x_d | loc_d, sigma_d) with a learned scale sigma_d per dimension."""

    support = (-float("inf"), float("inf"))

    def __init__(self, dim: int, init_scale: float = 1.0, min_scale: float = 1e-3):
        super().__init__()
        # Inverse softplus so that the initial scale is init_scale.
        self.raw_scale = nn.Parameter(torch.full((dim,), float(torch.tensor(init_scale).expm1().log())))
        self.min_scale = min_scale

    @property
    def scale(self) -> torch.Tensor:
        return F.softplus(self.raw_scale) + self.min_scale

    def forward(self, loc: torch.Tensor) -> dist.Distribution:
        return dist.Normal(loc, self.scale.expand_as(loc)).to_event(1)


LIKELIHOODS = {"bernoulli": BernoulliLikelihood, "gaussian": GaussianLikelihood}


def make_likelihood(name: str, dim: int) -> nn.Module:
    """Build the likelihood called ``name`` for ``dim``-dimensional data."""
    if name == "bernoulli":
        return BernoulliLikelihood()
    if name == "gaussian":
        return GaussianLikelihood(dim)
    raise ValueError(f"unknown likelihood {name!r}; choose one of {sorted(LIKELIHOODS)}")


def check_support(name: str, values: torch.Tensor, what: str = "data") -> None:
    """Raise a clear error if ``values`` lie outside the support of likelihood ``name``."""
    low, high = LIKELIHOODS[name].support
    if values.numel() and (values.min() < low or values.max() > high):
        raise ValueError(
            f"{what} has values in [{values.min().item():.4g}, {values.max().item():.4g}] but the {name} "
            f"likelihood needs values in [{low}, {high}]; rescale the data (e.g. divide pixels by 255) "
            "or choose likelihood = \"gaussian\""
        )
