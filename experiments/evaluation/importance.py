"""Held-out evaluation of any pair: test ELBO and the importance-sampled log-likelihood.

    log p(x_n) ~= log 1/K sum_k p(x_n, z_k) / q(z_k | x_n),   z_k ~ q(z | x_n)

(Burda et al. 2016; for conditional pairs the same estimate of log p(y_n | x_n) with q(z|x,y) as the
proposal, Sohn et al. 2015 eq. 7 -- not the ELBO that Pyro's CVAE tutorial reports). It is a
stochastic lower bound that tightens as K grows. Means come with their standard error over test points.

A non-amortized guide has no parameters for unseen points: a fresh one is fitted to the test points with
the model frozen (the amortization-gap protocol of Cremer et al. 2018) before the estimate is taken.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyro
import torch
from pyro.infer import Trace_ELBO
from torch import nn

from vae_priors.experiments.data.datasets import Split
from vae_priors.experiments.evaluation.log_weights import LogWeights, log_weights
from vae_priors.experiments.registry import Pair
from vae_priors.experiments.training import distributed


@dataclass
class Evaluation:
    weights: LogWeights
    guide: nn.Module  # the guide the estimate used (a refitted one for a non-amortized pair)
    note: str

    def per_point_log_likelihood(self) -> torch.Tensor:
        s = self.weights.log_w.shape[0]
        return torch.logsumexp(self.weights.log_w.double(), dim=0) - math.log(s)

    def per_point_elbo(self) -> torch.Tensor:
        return self.weights.log_w.double().mean(dim=0)

    def summary(self) -> dict[str, float]:
        ll, elbo = self.per_point_log_likelihood(), self.per_point_elbo()
        se = lambda t: (t.std(unbiased=True) / math.sqrt(t.numel())).item() if t.numel() > 1 else math.nan  # noqa: E731
        return {"test_elbo": elbo.mean().item(), "test_elbo_se": se(elbo),
                "test_log_lik": ll.mean().item(), "test_log_lik_se": se(ll)}


def fit_guide_frozen_model(model: nn.Module, guide: nn.Module, split: Split, steps: int, lr: float = 5e-2,
                           seed: int = 0) -> nn.Module:
    """Maximize the ELBO on ``split`` (full batch, Adam) over ``guide``'s parameters only; the model stays fixed."""
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        with torch.enable_grad():  # callers may hold no_grad (the diagnostics do); fitting needs gradients
            pyro.set_rng_seed(seed)
            loss_fn = Trace_ELBO()(model, guide)
            optimizer = torch.optim.Adam(guide.parameters(), lr=lr)
            for _ in range(steps):
                optimizer.zero_grad()
                (loss_fn(*split.tensors()) / len(split)).backward()
                optimizer.step()
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return guide


def refit_local_guide(pair: Pair, split: Split, steps: int, lr: float = 5e-2, seed: int = 0) -> nn.Module:
    """Fit a fresh per-point guide on ``split`` with the model frozen; returns the fitted guide."""
    return fit_guide_frozen_model(pair.model, pair.guide.for_new_points(len(split)), split, steps, lr, seed)


def evaluation_guide(pair: Pair, split: Split, guide: nn.Module | None = None, local_refit_steps: int = 500,
                     seed: int = 0) -> tuple[nn.Module, str]:
    """The guide to evaluate ``split`` with, and a note for the output.

    ``guide`` if given (e.g. a per-point guide already fitted on ``split``), else the pair's own guide when it
    is amortized, else a per-point guide fitted on ``split`` with the model frozen (``refit_local_guide``).
    """
    if getattr(pair.guide, "amortized", True):
        return (pair.guide if guide is None else guide), ""
    note = (f"per-point guide refitted on the {len(split)} test points ({local_refit_steps} Adam steps, "
            "decoder frozen)")
    return (refit_local_guide(pair, split, local_refit_steps, seed=seed) if guide is None else guide), note


def evaluate(pair: Pair, split: Split, num_particles: int = 1000, local_refit_steps: int = 500,
             seed: int = 0) -> Evaluation:
    """Per-point log weights on ``split`` with ``num_particles`` draws from the (possibly refitted) guide.

    Under a process group (torchrun) with an amortized guide, each rank weighs its contiguous share of the points
    with its own random stream (rank 0 keeps ``seed``) and every rank gets all of them back: with W processes the
    draws differ from one process's, so the numbers are reproducible for a given W. A per-point guide is refitted
    and evaluated by every rank on all points (its parameters belong to the points).
    """
    guide, note = evaluation_guide(pair, split, local_refit_steps=local_refit_steps, seed=seed)
    if not distributed.shards_points(len(split)) or not getattr(pair.guide, "amortized", True):
        pyro.set_rng_seed(seed)
        return Evaluation(log_weights(pair.model, guide, split.tensors(), num_particles), guide, note)
    pyro.set_rng_seed(distributed.point_seed(seed))
    mine = distributed.shard_points(len(split)).to(split.x.device)
    weights = log_weights(pair.model, guide, split.tensors(mine), num_particles)
    gathered = [distributed.gather_points(t, len(split)) for t in (weights.log_q, weights.log_p_z, weights.log_lik)]
    return Evaluation(LogWeights(*gathered), guide, note)
