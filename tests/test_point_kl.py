"""The per-point KL: Monte Carlo under a budget checked against the closed form it must reach."""

import pyro.distributions as dist
import torch

from vae_priors.experiments.diagnostics.point_kl import MIN_KL_DRAWS, mixture_width, point_kl
from vae_priors.models.mixture_distributions import GaussianMixture


def test_a_kl_budget_lowers_the_draws_per_point_but_keeps_the_estimate_unbiased():
    """K identical N(0, I) components: the mixture is N(0, I), so KL(q_n || p) has a closed form to check against."""
    g = torch.Generator().manual_seed(3)
    n, k = 400, 50
    q = dist.Normal(torch.randn(n, 3, generator=g), torch.rand(n, 3, generator=g) + 0.3).to_event(1)
    p = GaussianMixture(torch.zeros(n, k), torch.zeros(k, 3), torch.ones(k, 3))
    exact = torch.distributions.kl_divergence(q, dist.Normal(torch.zeros(n, 3), 1.0).to_event(1))
    budgeted = point_kl(q, p, num_draws=256, seed=0, max_evaluations=n * (1 + k) * 20)
    assert not budgeted.analytic and budgeted.num_draws == 20
    assert abs(float(budgeted.kl.double().mean() - exact.double().mean())) < 4 * budgeted.mean_se
    assert point_kl(q, p, num_draws=256, seed=0, max_evaluations=1).num_draws == MIN_KL_DRAWS
    assert point_kl(q, p, num_draws=256, seed=0).num_draws == 256  # no budget: the draws asked for


def test_mixture_width_counts_the_components_one_log_prob_evaluates():
    normal = dist.Normal(torch.zeros(4, 2), 1.0).to_event(1)
    mixture = dist.MixtureSameFamily(dist.Categorical(logits=torch.zeros(4, 5)),
                                     dist.Normal(torch.zeros(4, 5, 2), 1.0).to_event(1))
    shared = GaussianMixture(torch.zeros(1, 7), torch.zeros(7, 2), torch.ones(7, 2)).expand((4,))
    assert [mixture_width(d) for d in (normal, mixture, shared)] == [1, 5, 7]
