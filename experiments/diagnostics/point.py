"""Per-data-point diagnostics of any pair: importance-sampled log p(x_n), its PSIS version and Pareto k-hat,
the ELBO and KL(q(z|x_n) || p(z)) -- all read from Pyro traces (``vae_priors.experiments.evaluation.log_weights``).

    log p(x_n) ~= log 1/S sum_s w_s,   w_s = p(x_n, z_s) / q(z_s|x_n),   z_s ~ q(z|x_n)   (Burda et al. 2016)

PSIS (Yao et al. 2018; ArviZ ``psislw``, through ``arviz_adapter``) replaces the largest weights by a fitted
generalized Pareto tail; its shape k-hat says whether the estimate can be trusted: k-hat above
min(1 - 1/log10 S, 0.7) means the proposal q(z|x_n) is too narrow for p(z|x_n) and the estimate is unreliable.
For conditional pairs the same numbers are about log p(y_n|x_n) with q(z|x_n, y_n) as proposal; ``kl`` is then the
rate KL(q(z|x_n,y_n) || p(z|x_n)), and three more per-point numbers describe the x-conditioned prior:

* ``kl_prior_standard`` = KL(p(z|x_n) || N(0, I)): how far it moves from the independent prior;
* ``kl_prior_guide`` = KL(p(z|x_n) || q(z|x_n,y_n)): large where the prior puts mass the guide does not;
* ``conditional_hole_share``: the share of draws z ~ p(z|x_n) whose log q(z|x_n,y_n) is below the 1st percentile
  of log q at q's own draws -- the conditional analogue of prior holes (Rosca et al. 2018): where prediction
  (z ~ p(z|x)) lands in codes the generation network was not trained on for this point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from torch import nn

from vae_priors.experiments.data.datasets import Split, as_split
from vae_priors.experiments.diagnostics import arviz_adapter
from vae_priors.experiments.diagnostics.aggregate import posterior_components, prior_components
from vae_priors.experiments.diagnostics.distribution_batches import map_batch
from vae_priors.experiments.diagnostics.point_kl import point_kl
from vae_priors.experiments.evaluation.comparisons import standard_error
from vae_priors.experiments.evaluation.importance import evaluation_guide
from vae_priors.experiments.evaluation.log_weights import DEFAULT_MAX_ELEMENTS, log_weights
from vae_priors.experiments.registry import Pair
from vae_priors.experiments.training import distributed

khat_threshold = arviz_adapter.khat_threshold


@dataclass
class PointDiagnostics:
    """One entry per data point (numpy arrays), plus the guide the numbers were computed with."""

    log_lik_is: np.ndarray  # (N,) log-mean-exp of the S importance weights
    log_lik_psis: np.ndarray  # (N,) the same with PSIS-smoothed weights
    khat: np.ndarray  # (N,) Pareto shape of each point's weights
    elbo: np.ndarray  # (N,) mean of the S log weights
    kl: np.ndarray  # (N,) KL(q(z|x_n) || p(z)), analytic where torch's KL registry has the pair
    kl_analytic: bool
    kl_draws: int  # Monte Carlo draws per point for ``kl`` (0 where analytic)
    kl_per_dim: np.ndarray | None  # (N, D) where prior and guide factorize
    kl_prior_standard: np.ndarray | None  # (N,) conditional pairs: KL(p(z|x_n) || N(0, I))
    kl_prior_guide: np.ndarray | None  # (N,) conditional pairs: KL(p(z|x_n) || q(z|x_n,y_n))
    conditional_hole_share: np.ndarray | None  # (N,) conditional pairs: share of p(z|x_n) draws in q's 1 % tail
    num_particles: int
    guide: nn.Module
    note: str = ""

    @property
    def good_khat(self) -> float:
        return khat_threshold(self.num_particles)

    def summary(self) -> dict[str, float]:
        se = standard_error
        return {"log_lik_is": float(self.log_lik_is.mean()), "log_lik_is_se": se(self.log_lik_is),
                "log_lik_psis": float(self.log_lik_psis.mean()), "log_lik_psis_se": se(self.log_lik_psis),
                "elbo": float(self.elbo.mean()), "elbo_se": se(self.elbo), "mean_kl_points": float(self.kl.mean()),
                "share_khat_bad": float((self.khat > self.good_khat).mean()), "good_khat": self.good_khat}


def _standard_normal_like(p: torch.distributions.Distribution) -> dist.Distribution:
    zeros = torch.zeros(p.batch_shape + p.event_shape, dtype=p.mean.dtype, device=p.mean.device)
    return dist.Normal(zeros, torch.ones_like(zeros)).to_event(len(p.event_shape))


@torch.no_grad()
def point_diagnostics(pair: Pair, split: Split | torch.Tensor | tuple[torch.Tensor, ...], num_particles: int = 1000,
                      seed: int = 0, max_elements: int = DEFAULT_MAX_ELEMENTS, guide: nn.Module | None = None,
                      local_refit_steps: int = 500, kl_draws: int = 256, batch_size: int = 4096,
                      hole_draws: int = 200, kl_max_evaluations: int | None = None) -> PointDiagnostics:
    """Per-point diagnostics on ``split`` with ``num_particles`` importance samples per point.

    Memory: the log weights are (S, N) float32 (three such tensors); the traces are chunked over points so that
    no site holds more than ``max_elements`` numbers (``vae_priors.experiments.evaluation.log_weights``).

    Under a process group (torchrun) with an amortized guide, every number here is per point, so each rank
    computes its contiguous share of the points with its own random stream (rank 0 keeps ``seed``) and every rank
    gets all of them back, in order; the KL budget is split in proportion, so each point gets the draws it would
    get in one process. A per-point guide is evaluated by every rank on all points (its parameters belong to them).

    :param split: a ``Split``, or the points themselves: a tensor x (N, D), or ``(x, y)`` for a conditional pair.
    :param kl_draws, kl_max_evaluations: Monte Carlo draws per point for KLs without a closed form, and the budget
        that lowers them (``point_kl.point_kl``).
    """
    split = as_split(split)
    guide, note = evaluation_guide(pair, split, guide, local_refit_steps, seed)
    settings = dict(num_particles=num_particles, max_elements=max_elements, kl_draws=kl_draws,
                    batch_size=batch_size, hole_draws=hole_draws)
    if not distributed.shards_points(len(split)) or not getattr(guide, "amortized", True):
        numbers = _point_numbers(pair, guide, split, seed=seed, kl_max_evaluations=kl_max_evaluations, **settings)
    else:  # floor(floor(M n_r / N) / (n_r K)) = floor(M / (N K)): the draws per point of one process
        mine = distributed.shard_points(len(split)).to(split.x.device)
        budget = None if kl_max_evaluations is None else kl_max_evaluations * len(mine) // len(split)
        numbers = _point_numbers(pair, guide, split.subset(mine), seed=distributed.point_seed(seed),
                                 kl_max_evaluations=budget, **settings)
        numbers = {k: _gathered(v, len(split)) if isinstance(v, np.ndarray) else v for k, v in numbers.items()}
    return PointDiagnostics(**numbers, num_particles=num_particles, guide=guide, note=note)


def _gathered(values: np.ndarray, num_points: int) -> np.ndarray:
    return distributed.gather_rows(torch.from_numpy(np.ascontiguousarray(values)), num_points).numpy()


def _point_numbers(pair: Pair, guide: nn.Module, split: Split, num_particles: int, seed: int, max_elements: int,
                   kl_draws: int, batch_size: int, hole_draws: int, kl_max_evaluations: int | None) -> dict:
    """The per-point fields of ``PointDiagnostics`` for the points of ``split`` (numpy arrays, rows = points)."""
    args = split.tensors()
    pyro.set_rng_seed(seed)
    weights = log_weights(pair.model, guide, args, num_particles, max_elements)
    log_w = weights.log_w.double()
    log_s = math.log(num_particles)
    smoothed, khat = arviz_adapter.psis(log_w.T.cpu().numpy())
    q = posterior_components(guide, args, batch_size)
    p = prior_components(pair.model, guide, args, batch_size)
    kl, per_dim, analytic, _, used_draws = point_kl(q, p, kl_draws, seed, max_elements, kl_max_evaluations)
    kl_standard = kl_prior_guide = holes = None
    if pair.conditional:
        kl_standard = point_kl(p, _standard_normal_like(p), kl_draws, seed, max_elements,
                               kl_max_evaluations).kl.double().cpu().numpy()
        kl_prior_guide = point_kl(p, q, kl_draws, seed, max_elements, kl_max_evaluations).kl.double().cpu().numpy()
        holes = conditional_hole_share(p, q, hole_draws, seed, max_elements)
    return dict(
        log_lik_is=(torch.logsumexp(log_w, 0) - log_s).cpu().numpy(),
        log_lik_psis=np.logaddexp.reduce(smoothed, axis=1) - log_s, khat=np.asarray(khat, dtype=np.float64),
        elbo=log_w.mean(0).cpu().numpy(), kl=kl.double().cpu().numpy(), kl_analytic=analytic, kl_draws=used_draws,
        kl_per_dim=None if per_dim is None else per_dim.double().cpu().numpy(),
        kl_prior_standard=kl_standard, kl_prior_guide=kl_prior_guide, conditional_hole_share=holes)


@torch.no_grad()
def conditional_hole_share(p: torch.distributions.Distribution, q: torch.distributions.Distribution, num_draws: int,
                           seed: int = 0, max_elements: int = DEFAULT_MAX_ELEMENTS, level: float = 0.01) -> np.ndarray:
    """Per point n: the share of ``num_draws`` draws z ~ p_n with log q_n(z) below the ``level`` quantile of
    log q_n at ``num_draws`` draws from q_n itself. About ``level`` when p_n = q_n; near 1 when p_n lands elsewhere."""
    (n,), width = q.batch_shape, max(q.event_shape.numel(), 1)
    step = max(1, max_elements // (num_draws * width))
    out = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, n, step):
            qs, ps = (map_batch(d, lambda t, s=start: t[s : s + step]) for d in (q, p))
            own = qs.log_prob(qs.sample((num_draws,))).double()
            threshold = torch.quantile(own, level, dim=0)
            out.append((qs.log_prob(ps.sample((num_draws,))).double() < threshold).double().mean(0))
    return torch.cat(out).cpu().numpy()


@torch.no_grad()
def inference_arrays(pair: Pair, split: Split, index: torch.Tensor, num_draws: int, guide: nn.Module,
                     seed: int = 0) -> dict[str, np.ndarray]:
    """The arrays ``arviz_adapter.to_inference_data`` takes, for the points ``index`` of ``split``.

    Posterior draws z ~ q(z|x_n) with their log weights, and as many draws from the model's ``"z"``
    distribution for the same points. ``guide`` must be the one the diagnostics used (``PointDiagnostics.guide``);
    for a per-point guide ``index`` refers to its points.
    """
    index = torch.as_tensor(index, device=split.x.device)
    pyro.set_rng_seed(seed)
    if getattr(guide, "amortized", True):
        args = split.tensors(index)
        weights, z = log_weights(pair.model, guide, args, num_draws, return_z=True)
        p = prior_components(pair.model, guide, args)
    else:  # a per-point guide needs the whole split in its plate; keep the rows asked for
        weights, z = log_weights(pair.model, guide, split.tensors(), num_draws, return_z=True)
        weights = type(weights)(*(t[:, index] for t in (weights.log_q, weights.log_p_z, weights.log_lik)))
        z = z[:, index]
        p = map_batch(prior_components(pair.model, guide, split.tensors()), lambda t: t[index])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        z_prior = p.sample((num_draws,))
    observed = split.y if split.y is not None else split.x
    return {"z_posterior": z.cpu().numpy(), "z_prior": z_prior.cpu().numpy(), "log_lik": weights.log_lik.cpu().numpy(),
            "log_w": weights.log_w.cpu().numpy(), "log_q": weights.log_q.cpu().numpy(),
            "log_p_z": weights.log_p_z.cpu().numpy(), "observed": observed[index].cpu().numpy(),
            "obs_index": index.cpu().numpy(), "observed_name": "y" if split.y is not None else "x"}


__all__ = ["PointDiagnostics", "point_diagnostics", "inference_arrays", "khat_threshold"]
