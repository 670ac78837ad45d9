"""The aggregated posterior q_agg(z) = 1/N sum_n q(z|x_n) of any pair, and how it relates to the prior.

Everything is read from Pyro traces: q(z|x_n) is the guide's ``"z"`` distribution, p(z) the model's ``"z"``
distribution after replaying the model on the guide's draws (so p(z), p(z|x) or a mixture prior all work).

ELBO surgery (Hoffman & Johnson 2016): with one prior p shared by all points,

    1/N sum_n KL(q(z|x_n) || p(z)) = I_q(n; z) + KL(q_agg || p),   0 <= I_q <= log N.

KL(q_agg || p) is estimated by Monte Carlo with draws from q_agg and log q_agg(z) a logsumexp over all N
components; I_q is reported both as mean KL - KL(q_agg || p) and directly, E_{n, z ~ q_n}[log q_n(z) - log q_agg(z)];
their difference ``surgery_residual`` is zero up to Monte Carlo error.

When the prior differs per point (conditional pairs: p(z|x_n) with q(z|x_n, y_n); leave-one-out mixture priors)
"p" in the aggregate means the aggregated prior p_agg(z) = 1/N sum_n p(z|x_n), and the identity gains a term:
mean KL = I_q + KL(q_agg || p_agg) + E_n E_{q_n}[log p_agg(z) - log p(z|x_n)]; that last term is
``surgery_residual`` (how much the prior uses x). ``mutual_info`` is then the direct estimate.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import pyro.poutine as poutine
import torch
from torch import nn
from torch.distributions import Distribution, Independent, Normal

from vae_priors.experiments.data.datasets import Split
from vae_priors.experiments.diagnostics.distribution_batches import (
    batch_tensors,
    cat_batch,
    map_batch,
    shared_component,
)
from vae_priors.experiments.diagnostics.point_kl import sharded_point_kl
from vae_priors.experiments.registry import Pair
from vae_priors.experiments.training import distributed
from vae_priors.models.plate import subsample


@torch.no_grad()
def _site_distribution(guide: nn.Module, args: tuple[torch.Tensor, ...], batch_size: int,
                       model: nn.Module | None = None) -> Distribution:
    n, parts = args[0].shape[0], []
    modules = [m for m in (guide, model) if m is not None]
    was_training = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        for start in range(0, n, batch_size):
            index = torch.arange(start, min(start + batch_size, n), device=args[0].device)
            chunk = tuple(a[index] for a in args)
            with subsample(index, n):  # per-point guides read their parameters at these indices
                trace = poutine.trace(guide).get_trace(*chunk)
                if model is not None:
                    trace = poutine.trace(poutine.replay(model, trace=trace)).get_trace(*chunk)
            if "z" not in trace.nodes:
                raise ValueError("the pair has no sample site 'z' (see the model/guide contract in the registry)")
            site = trace.nodes["z"]["fn"]
            if tuple(site.batch_shape) != (len(index),):
                raise ValueError(f"the 'z' site has batch shape {tuple(site.batch_shape)}; expected ({len(index)},)")
            parts.append(site)
    finally:
        for m, flag in zip(modules, was_training, strict=True):
            m.train(flag)
    return cat_batch(parts)


def posterior_components(guide: nn.Module, args: tuple[torch.Tensor, ...], batch_size: int = 4096) -> Distribution:
    """q(z|x_n) for every point in ``args``: batch shape (N,), event shape (D,), read from the guide's trace.

    Points are traced in batches of ``batch_size`` inside ``subsample(index, N)``, so a per-point guide uses the
    parameters of points ``arange(N)``.
    """
    return _site_distribution(guide, args, batch_size)


def prior_components(model: nn.Module, guide: nn.Module, args: tuple[torch.Tensor, ...],
                     batch_size: int = 4096) -> Distribution:
    """p(z | n) for every point: the model's ``"z"`` distribution, traced with the model replayed on guide draws."""
    return _site_distribution(guide, args, batch_size, model)


def is_diagonal_normal(d: Distribution) -> bool:
    return isinstance(d, Independent) and isinstance(d.base_dist, Normal) and d.reinterpreted_batch_ndims == 1


@torch.no_grad()
def log_q_agg(z: torch.Tensor, components: Distribution, chunk_elements: int = 2**24) -> torch.Tensor:
    """log q_agg(z_m) = logsumexp_n log q(z_m|x_n) - log N, shape (M,), in float64.

    Memory: M and N are processed in blocks of m x n with m * n * D <= ``chunk_elements`` float64 numbers
    (diagonal Gaussians use a matrix product and need only m * n); a running logsumexp joins the N blocks.
    """
    if z.ndim != 2:
        raise ValueError(f"z must be (M, D), got shape {tuple(z.shape)}")
    (n,) = components.batch_shape
    comps = map_batch(components, lambda t: t.double())
    z = z.double().to(batch_tensors(comps)[0].device)
    diag = is_diagonal_normal(comps)
    width = 1 if diag else z.shape[1]
    step_n = max(1, min(n, chunk_elements // width))
    step_m = max(1, chunk_elements // (step_n * width))
    if diag:  # -1/2 sum_d (z_d - mu_d)^2 / s_d^2 + const as one matrix product [z^2, z, 1] @ [-prec/2, mu prec, c]^T
        loc, scale = comps.base_dist.loc, comps.base_dist.scale
        prec = scale**-2
        const = -0.5 * (loc**2 * prec).sum(-1) - scale.log().sum(-1) - 0.5 * z.shape[1] * math.log(2 * math.pi)
        right = torch.cat([-0.5 * prec, loc * prec, const[:, None]], dim=1).T
    out = []
    for m0 in range(0, z.shape[0], step_m):
        zm = z[m0 : m0 + step_m]
        left = torch.cat([zm**2, zm, torch.ones_like(zm[:, :1])], dim=1) if diag else None
        total = torch.full((zm.shape[0],), -math.inf, dtype=torch.float64, device=z.device)
        for n0 in range(0, n, step_n):
            sl = slice(n0, n0 + step_n)
            if diag:
                lp = left @ right[:, sl]
            else:
                lp = map_batch(comps, lambda t, sl=sl: t[sl]).log_prob(zm[:, None, :])
            top = lp.max(dim=1, keepdim=True).values.clamp_min(-1e300)  # in place: the block is the memory bound
            total = torch.logaddexp(total, lp.sub_(top).exp_().sum(1).log_() + top[:, 0])
        out.append(total)
    return torch.cat(out) - math.log(n)


@torch.no_grad()
def draw_mixture(components: Distribution, num: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``num`` draws from 1/N sum_n components[n]: (z (num, D), component index (num,), log components[n](z) (num,)).

    A uniform component index, then one draw from it. Memory: (max draws of one component) x N x D.
    """
    (n,) = components.batch_shape
    device = batch_tensors(components)[0].device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        index = torch.randint(n, (num,), device=device)
        counts = torch.bincount(index, minlength=n)
        draws = components.sample((int(counts.max()),))  # (r, N, D): draw j of component n at [j, n]
    own = components.log_prob(draws)
    order = torch.argsort(index, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(index)
    rank[order] = torch.arange(num, device=device) - starts[index[order]]
    return draws[rank, index], index, own[rank, index]


def sample_q_agg(components: Distribution, num: int, seed: int = 0) -> torch.Tensor:
    """``num`` draws (num, D) from q_agg = 1/N sum_n q(z|x_n): a uniform component, then a draw from it."""
    return draw_mixture(components, num, seed)[0]


def _sharded_log_q_agg(z: torch.Tensor, components: Distribution, chunk_elements: int) -> torch.Tensor:
    """``log_q_agg`` with the draws ``z`` split over ranks; every rank gets all of them back, in order."""
    if not distributed.shards_points(z.shape[0]):
        return log_q_agg(z, components, chunk_elements)
    mine = distributed.shard_points(z.shape[0]).to(z.device)
    return distributed.gather_points(log_q_agg(z[mine], components, chunk_elements), z.shape[0])


@dataclass
class AggregateDiagnostics:
    """Aggregate numbers of one pair on one split; ``*_se`` are Monte Carlo standard errors."""

    num_points: int
    num_samples: int
    mean_kl: float
    mean_kl_se: float  # 0 where the KL is analytic
    kl_analytic: bool
    kl_draws: int  # Monte Carlo draws per point for the KLs (0 where analytic)
    mutual_info: float
    mutual_info_se: float
    mutual_info_direct: float
    mutual_info_direct_se: float
    surgery_residual: float  # mean KL - I_direct - KL(q_agg || p): 0 for a shared prior
    surgery_residual_se: float
    kl_qagg_p: float
    kl_qagg_p_se: float
    kl_p_qagg: float
    kl_p_qagg_se: float
    log_n: float
    prior_hole_share: float
    active_units: int
    unit_activity: np.ndarray  # (D,) Cov over points of E_q[z_d]
    kl_per_dim: np.ndarray | None  # (D,) mean over points
    collapsed_dims: list[int] | None  # dimensions with mean KL below the threshold
    shared_prior: bool

    def summary(self) -> dict[str, float]:
        """The scalar entries (one CSV row)."""
        return {k: v for k, v in asdict(self).items() if isinstance(v, int | float | bool)}


def _mean_se(t: torch.Tensor) -> tuple[float, float]:
    return float(t.mean()), float(t.std() / math.sqrt(t.numel())) if t.numel() > 1 else math.nan


@torch.no_grad()
def aggregate_diagnostics(pair: Pair, split: Split, num_samples: int = 10_000, seed: int = 0,
                          guide: nn.Module | None = None, batch_size: int = 4096, chunk_elements: int = 2**24,
                          active_threshold: float = 0.01, collapse_threshold: float = 0.01,
                          kl_draws: int = 256, kl_max_evaluations: int | None = None) -> AggregateDiagnostics:
    """ELBO surgery, KL(p || q_agg), the prior-hole share, active units and KL per dimension on ``split``.

    :param guide: the guide to aggregate (default ``pair.guide``); a per-point guide must have exactly one set of
        parameters per point of ``split`` (its training set, or a guide refitted on ``split``).
    :param num_samples: Monte Carlo draws from q_agg and from p each.
    :param kl_draws, kl_max_evaluations: Monte Carlo draws per point for KL(q_n || p_n) where it has no closed
        form, and the budget that lowers them (``point_kl``).

    Under a process group (torchrun) the work is split over ranks and every rank returns the same numbers: the
    per-point KLs by points (each rank its share, its own Monte Carlo stream where there is no closed form), and
    the densities of q_agg and p at the Monte Carlo draws by draws, the draws being the same on every rank. With
    analytic KLs the numbers are those of one process, to float precision.

    Prior-hole share (Rosca et al. 2018): the fraction of prior draws whose log q_agg is below the 1st percentile
    of log q_agg at q_agg's own draws. Active units (Burda et al. 2016): Cov_n(E_q[z_d | x_n]) > ``active_threshold``.
    """
    guide = pair.guide if guide is None else guide
    if not getattr(guide, "amortized", True) and getattr(guide, "num_points", len(split)) != len(split):
        raise ValueError(f"the per-point guide has parameters for {guide.num_points} points but the split has "
                         f"{len(split)}; pass the training split or a guide refitted on this split (guide=...)")
    args = split.tensors()
    q = posterior_components(guide, args, batch_size)
    p = prior_components(pair.model, guide, args, batch_size)
    kl_n, kl_dims, analytic, mean_kl_se, used_draws = sharded_point_kl(q, p, kl_draws, seed, chunk_elements,
                                                                         kl_max_evaluations)
    mean_kl = float(kl_n.double().mean())
    shared = shared_component(p)
    p_agg = p if shared is None else shared

    # every rank draws the same z (same seed); each weighs its share of them against all N components
    density = lambda z, mixture: _sharded_log_q_agg(z, mixture, chunk_elements)  # noqa: E731
    z_q, _, log_q_own = draw_mixture(q, num_samples, seed)
    lq_q, lp_q = density(z_q, q), density(z_q, p_agg)
    z_p, _, _ = draw_mixture(p_agg, num_samples, seed + 1)
    lq_p, lp_p = density(z_p, q), density(z_p, p_agg)

    kl_qagg, kl_qagg_se = _mean_se(lq_q - lp_q)
    kl_pq, kl_pq_se = _mean_se(lp_p - lq_p)
    info_direct, info_direct_se = _mean_se(log_q_own.double() - lq_q)
    cross, cross_se = _mean_se(log_q_own.double() - lp_q)  # E_n E_{q_n}[log q_n - log p_agg]
    threshold = torch.quantile(lq_q, 0.01)
    activity = q.mean.double().var(dim=0, unbiased=False)
    per_dim = None if kl_dims is None else kl_dims.double().mean(0).cpu().numpy()
    return AggregateDiagnostics(
        num_points=len(split), num_samples=num_samples, mean_kl=mean_kl, mean_kl_se=mean_kl_se, kl_analytic=analytic,
        kl_draws=used_draws,
        mutual_info=mean_kl - kl_qagg if shared is not None else info_direct,
        mutual_info_se=math.hypot(mean_kl_se, kl_qagg_se) if shared is not None else info_direct_se,
        mutual_info_direct=info_direct, mutual_info_direct_se=info_direct_se,
        surgery_residual=mean_kl - cross, surgery_residual_se=math.hypot(mean_kl_se, cross_se),
        kl_qagg_p=kl_qagg, kl_qagg_p_se=kl_qagg_se, kl_p_qagg=kl_pq, kl_p_qagg_se=kl_pq_se,
        log_n=math.log(len(split)), prior_hole_share=float((lq_p < threshold).double().mean()),
        active_units=int((activity > active_threshold).sum()), unit_activity=activity.cpu().numpy(),
        kl_per_dim=per_dim,
        collapsed_dims=None if per_dim is None else [int(d) for d in np.flatnonzero(per_dim < collapse_threshold)],
        shared_prior=shared is not None)
