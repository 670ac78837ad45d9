"""KL(q(z|x_n) || p(z|x_n)) point by point, for any pair of distribution batches the diagnostics read from traces.

Analytic where torch's KL registry has the pair, otherwise Monte Carlo under a budget: a prior that mixes all N
training encodings costs N x N component densities per draw, so the draws per point come down (never below
``MIN_KL_DRAWS``) and the estimate stays unbiased with a larger standard error. Under a process group (torchrun)
``sharded_point_kl`` splits the points over ranks.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.distributions import Distribution, Independent, MixtureSameFamily
from torch.distributions.kl import kl_divergence

from vae_priors.experiments.diagnostics.distribution_batches import batch_tensors, map_batch
from vae_priors.experiments.training import distributed


class PointKL(NamedTuple):
    kl: torch.Tensor  # (N,)
    per_dim: torch.Tensor | None  # (N, D)
    analytic: bool
    mean_se: float  # Monte Carlo standard error of kl.mean() (0 where analytic)
    num_draws: int  # Monte Carlo draws per point (0 where analytic)


MIN_KL_DRAWS = 8  # a Monte Carlo KL never uses fewer draws per point, whatever the budget


def mixture_width(d: Distribution) -> int:
    """How many component densities one ``d.log_prob`` evaluates per point: K for a mixture, else 1."""
    if hasattr(d, "point_logits"):  # models.mixture_distributions.GaussianMixture
        return int(d.point_logits.shape[-1])
    if isinstance(d, MixtureSameFamily):
        return int(d.mixture_distribution.logits.shape[-1])
    return 1


@torch.no_grad()
def point_kl(q: Distribution, p: Distribution, num_draws: int = 256, seed: int = 0,
             max_elements: int = 2**24, max_evaluations: int | None = None) -> PointKL:
    """KL(q_n || p_n) for batches of N components, and per dimension where both factorize.

    Analytic where torch's KL registry has the pair; otherwise Monte Carlo with ``num_draws`` draws per point,
    in chunks of at most ``max_elements`` numbers. ``max_evaluations`` bounds the Monte Carlo work, counted as
    N x draws x (components per log_prob of q and of p, ``mixture_width``): above it each point gets fewer draws,
    never fewer than ``MIN_KL_DRAWS``. Each point's estimate stays unbiased and ``mean_se`` grows to match; this is
    what makes the KL to a prior that mixes all N training encodings (N x N components per draw) affordable.
    Per dimension wherever both factorize (``Independent`` over one event dimension): analytic where the registry
    has the univariate pair, else by Monte Carlo on the same draws (the per-dimension terms then sum to the total
    estimate exactly).
    """
    per_dim = None
    factorized = isinstance(q, Independent) and isinstance(p, Independent) and \
        q.reinterpreted_batch_ndims == 1 == p.reinterpreted_batch_ndims
    if factorized:
        try:
            per_dim = kl_divergence(q.base_dist, p.base_dist)
        except NotImplementedError:
            per_dim = None  # by Monte Carlo below, dimension by dimension
    try:
        return PointKL(kl_divergence(q, p), per_dim, True, 0.0, 0)
    except NotImplementedError:
        pass
    (n,), width = q.batch_shape, max(q.event_shape.numel(), 1)
    if max_evaluations is not None:
        per_draw = max(1, n * (mixture_width(q) + mixture_width(p)))
        num_draws = min(num_draws, max(MIN_KL_DRAWS, max_evaluations // per_draw))
    step = max(1, max_elements // (num_draws * width))
    parts, variances, dims = [], [], []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, n, step):
            qs, ps = (map_batch(d, lambda t, s=start: t[s : s + step]) for d in (q, p))
            z = qs.sample((num_draws,))
            terms = (qs.log_prob(z) - ps.log_prob(z)).double()
            parts.append(terms.mean(0))
            variances.append(terms.var(0) / num_draws)
            if factorized and per_dim is None:  # the same draws, each dimension's own log-ratio
                dims.append((qs.base_dist.log_prob(z) - ps.base_dist.log_prob(z)).double().mean(0))
    if dims:
        per_dim = torch.cat(dims)
    return PointKL(torch.cat(parts), per_dim, False, float(torch.cat(variances).sum().sqrt() / n), num_draws)


def sharded_point_kl(q: Distribution, p: Distribution, num_draws: int, seed: int, max_elements: int,
                      max_evaluations: int | None) -> PointKL:
    """``point_kl`` with the points split over ranks (``training.distributed``); the whole result on every rank."""
    (n,) = q.batch_shape
    if not distributed.shards_points(n):
        return point_kl(q, p, num_draws, seed, max_elements, max_evaluations)
    mine = distributed.shard_points(n).to(batch_tensors(q)[0].device)
    budget = None if max_evaluations is None else max_evaluations * len(mine) // n  # one process's draws per point
    part = point_kl(*(map_batch(d, lambda t: t[mine]) for d in (q, p)), num_draws, distributed.point_seed(seed),
                    max_elements, budget)
    # mean_se = sqrt(sum of per-point variances) / n: add the ranks' sums of variances
    variance_sum = distributed.sum_over_ranks(torch.tensor((part.mean_se * len(mine)) ** 2, dtype=torch.float64))
    per_dim = None if part.per_dim is None else distributed.gather_rows(part.per_dim, n)
    return PointKL(distributed.gather_rows(part.kl, n), per_dim, part.analytic, float(variance_sum.sqrt()) / n,
                   part.num_draws)
