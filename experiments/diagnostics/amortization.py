"""The amortization gap (Cremer, Li & Duvenaud 2018, "Inference suboptimality in variational autoencoders").

For a fixed decoder, the gap on a set of points is

    gap = 1/N sum_n [ ELBO(x_n; q*_n) - ELBO(x_n; q(z|x_n)) ],

where q(z|x_n) is the encoder's Gaussian and q*_n the best Gaussian for x_n alone, approximated by a per-point
guide (``guides.local_normal.LocalNormalGuide``) fitted with the model frozen, started at the encoder's output so
that the optimization starts from the amortized solution. Both ELBOs are estimated on the same points with the
same number of draws. What is compared is inference only: one decoder, two ways of choosing q.
"""

from __future__ import annotations

import math

import pyro
import torch

from vae_priors.experiments.data.datasets import Split
from vae_priors.experiments.diagnostics.aggregate import is_diagonal_normal, posterior_components
from vae_priors.experiments.evaluation.importance import fit_guide_frozen_model
from vae_priors.experiments.evaluation.log_weights import log_weights
from vae_priors.experiments.registry import Pair
from vae_priors.experiments.training import distributed
from vae_priors.guides.local_normal import LocalNormalGuide


class NotDiagonalGaussianGuide(ValueError):
    """The guide's q(z|x) is not a diagonal Gaussian, so there is no per-point Gaussian of the same family."""


def fit_local_guide(pair: Pair, split: Split, steps: int, lr: float = 1e-2, seed: int = 0) -> LocalNormalGuide:
    """A per-point diagonal Gaussian for each point of ``split``, initialized at the pair's q(z|x_n) and fitted
    by maximizing the ELBO with the model's parameters frozen."""
    q = posterior_components(pair.guide, split.tensors())
    if not is_diagonal_normal(q):  # a TransformedDistribution also has a base_dist: check the family itself
        raise NotDiagonalGaussianGuide(f"the amortization gap needs a diagonal-Gaussian guide; this one gives "
                                       f"{type(q).__name__}")
    local = LocalNormalGuide(len(split), q.event_shape[-1])
    with torch.no_grad():
        local.loc.copy_(q.base_dist.loc)
        local.raw_scale.copy_((q.base_dist.scale - 1e-3).clamp_min(1e-6).expm1().log())  # inverse of softplus + 1e-3
    return fit_guide_frozen_model(pair.model, local, split, steps, lr, seed)


def amortization_gap(pair: Pair, split: Split, steps: int, num_particles: int = 1000,
                     seed: int = 0) -> tuple[float, float]:
    """(mean gap, its standard error over points) in nats per point: local ELBO - amortized ELBO, same decoder.

    Under a process group (torchrun) each rank fits and scores its contiguous share of the points (each point's
    Gaussian is fitted on its own ELBO alone, so the split changes only the random streams, rank 0 keeping ``seed``,
    and Adam's epsilon) and every rank returns the gap over all of them.
    """
    if distributed.shards_points(len(split)):
        mine = distributed.shard_points(len(split)).to(split.x.device)
        gap = distributed.gather_points(_point_gaps(pair, split.subset(mine), steps, num_particles,
                                                    distributed.point_seed(seed)), len(split))
    else:
        gap = _point_gaps(pair, split, steps, num_particles, seed)
    return float(gap.mean()), float(gap.std() / math.sqrt(gap.numel())) if gap.numel() > 1 else math.nan


def _point_gaps(pair: Pair, split: Split, steps: int, num_particles: int, seed: int) -> torch.Tensor:
    """Per point of ``split``: local ELBO - amortized ELBO (float64, shape (N,))."""
    local = fit_local_guide(pair, split, steps, seed=seed)
    pyro.set_rng_seed(seed)
    amortized = log_weights(pair.model, pair.guide, split.tensors(), num_particles).log_w.double().mean(0)
    fitted = log_weights(pair.model, local, split.tensors(), num_particles).log_w.double().mean(0)
    return fitted - amortized
