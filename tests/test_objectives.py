"""Tests of experiments.training.objectives: the IWAE bound against closed forms and brute force, and the KL weight."""

from __future__ import annotations

import math

import pyro
import pyro.poutine as poutine
import pytest
import torch
from pyro.distributions import TorchDistribution, constraints
from pyro.infer import Trace_ELBO
from torch import nn

from vae_priors.experiments.training.objectives import IWAE, kl_weight, make_elbo
from vae_priors.models.linear_gaussian import ExactPosteriorGuide
from vae_priors.models.plate import data_plate, subsample


class FixedDraw(TorchDistribution):
    """Returns the given draws (particles, batch, latent) but scores them under ``base`` (q(z|x))."""

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, base: TorchDistribution, draws: torch.Tensor):
        self.base, self.draws = base, draws
        super().__init__(draws.shape[:-1], draws.shape[-1:], validate_args=False)

    def expand(self, batch_shape, _instance=None):
        assert tuple(batch_shape) == tuple(self.batch_shape), (batch_shape, self.batch_shape)
        return self

    def rsample(self, sample_shape=()):
        return self.draws

    def log_prob(self, value):
        return self.base.log_prob(value)


class FixedDrawGuide(nn.Module):
    """A guide whose "z" draws are fixed in advance: the importance weights can then be recomputed by hand."""

    def __init__(self, guide: nn.Module, draws: torch.Tensor):
        super().__init__()
        self.guide, self.draws = guide, draws

    def forward(self, x):
        with data_plate(x.shape[0]):
            return pyro.sample("z", FixedDraw(self.guide.encode(x), self.draws))


def test_iwae_with_exact_posterior_guide_equals_exact_log_marginal_for_any_k(ppca, ppca_x):
    model, guide = ppca.model(), ExactPosteriorGuide(ppca)
    exact = ppca.log_marginal(ppca_x).sum().item()
    for k in (1, 7, 50):
        loss = IWAE(k)(model, guide)(ppca_x).item()
        assert loss == pytest.approx(-exact, rel=1e-5), f"K={k}"


def test_iwae_k1_equals_trace_elbo_on_the_same_draws(ppca, ppca_x):
    model, guide = ppca.model(), ExactPosteriorGuide(ppca, scale_factor=1.6)
    for seed in range(3):
        pyro.set_rng_seed(seed)
        iwae = IWAE(1)(model, guide)(ppca_x).item()
        pyro.set_rng_seed(seed)
        elbo = Trace_ELBO()(model, guide)(ppca_x).item()
        assert iwae == pytest.approx(elbo, rel=1e-5)


def test_iwae_bound_increases_with_k_towards_exact_log_marginal(ppca, ppca_x):
    model, guide = ppca.model(), ExactPosteriorGuide(ppca, scale_factor=1.6)
    exact = ppca.log_marginal(ppca_x).mean().item()
    bounds, errors = {}, {}
    for k in (1, 10, 100):
        draws = torch.tensor([-IWAE(k)(model, guide)(ppca_x).item() / len(ppca_x) for _ in range(20)])
        bounds[k], errors[k] = draws.mean().item(), draws.std().item() / math.sqrt(len(draws))
    for small, large in ((1, 10), (10, 100)):
        assert bounds[large] - bounds[small] > 4 * math.hypot(errors[large], errors[small]), bounds
    assert bounds[100] < exact + 4 * errors[100]
    assert exact - bounds[100] < exact - bounds[1]


def test_iwae_under_subsampling_scales_the_per_point_logsumexp_not_the_weights(ppca, ppca_x):
    """Fixed draws z make the bound computable by brute force in float64:
    (N/B) sum_{n in batch} [logsumexp_k log w_kn - log K]. Log-sum-exp of the N/B-scaled weights differs."""
    model, guide = ppca.model(), ExactPosteriorGuide(ppca, scale_factor=1.6)
    n, index, k = len(ppca_x), torch.tensor([3, 10, 11, 40, 59]), 6
    x = ppca_x[index]
    q = guide.encode(x)
    z = q.sample((k,))  # (K, B, latent)
    z64, w, b = z.double(), ppca.weight.double(), ppca.bias.double()
    normal = torch.distributions.Normal
    log_w = (normal(0.0, 1.0).log_prob(z64).sum(-1) + normal(z64 @ w.T + b, ppca.sigma).log_prob(x.double()).sum(-1)
             - q.log_prob(z).double())
    scale = n / len(index)
    expected = -scale * (torch.logsumexp(log_w, 0) - math.log(k)).sum()
    wrong = -(torch.logsumexp(scale * log_w, 0) - math.log(k)).sum()
    assert abs(wrong - expected) > 1.0  # the test can tell the two apart
    with subsample(index, n):
        loss = IWAE(k)(model, FixedDrawGuide(guide, z))(x)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_kl_weight_scales_exactly_the_latent_terms_in_model_and_guide(ppca, ppca_x):
    model, guide = ppca.model(), ExactPosteriorGuide(ppca, scale_factor=1.6)
    beta = 0.3

    def traces():
        pyro.set_rng_seed(1)
        guide_trace = poutine.trace(guide).get_trace(ppca_x)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(ppca_x)
        model_trace.compute_log_prob(), guide_trace.compute_log_prob()
        return model_trace.nodes, guide_trace.nodes

    plain_model, plain_guide = traces()
    with kl_weight(beta):
        weighted_model, weighted_guide = traces()
    torch.testing.assert_close(weighted_model["z"]["log_prob"], beta * plain_model["z"]["log_prob"])
    torch.testing.assert_close(weighted_guide["z"]["log_prob"], beta * plain_guide["z"]["log_prob"])
    torch.testing.assert_close(weighted_model["x"]["log_prob"], plain_model["x"]["log_prob"])
    # and the loss is -(log p(x|z) + beta * (log p(z) - log q(z|x))) on the same draws
    pyro.set_rng_seed(1)
    with kl_weight(beta):
        loss = Trace_ELBO()(model, guide)(ppca_x)
    latent = plain_model["z"]["log_prob"].sum() - plain_guide["z"]["log_prob"].sum()
    expected = -(plain_model["x"]["log_prob"].sum() + beta * latent)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_kl_weight_one_changes_nothing(ppca, ppca_x):
    model, guide = ppca.model(), ExactPosteriorGuide(ppca, scale_factor=1.6)
    pyro.set_rng_seed(2)
    plain = Trace_ELBO()(model, guide)(ppca_x).item()
    pyro.set_rng_seed(2)
    with kl_weight(1.0):
        weighted = Trace_ELBO()(model, guide)(ppca_x).item()
    assert weighted == plain


@pytest.mark.parametrize("name", ["trace", "iwae"])
def test_sampled_objectives_are_exact_under_the_exact_posterior_guide(name, ppca, ppca_x):
    """log p(x, z) - log q(z|x) = log p(x) for every draw when q is the exact posterior: no MC noise."""
    loss = make_elbo(name, num_particles=3)(ppca.model(), ExactPosteriorGuide(ppca))(ppca_x)
    assert loss.item() == pytest.approx(-ppca.log_marginal(ppca_x).sum().item(), rel=1e-5)


def test_meanfield_objective_is_unbiased_for_the_elbo_with_analytic_kl(ppca, ppca_x):
    """Under the exact posterior guide the ELBO is log p(x); TraceMeanField's estimate (analytic KL, sampled
    likelihood) is noisy but its mean over draws must match within the standard error."""
    loss_fn = make_elbo("meanfield", num_particles=1)(ppca.model(), ExactPosteriorGuide(ppca))
    draws = torch.tensor([-loss_fn(ppca_x).item() for _ in range(200)])
    exact = ppca.log_marginal(ppca_x).sum().item()
    assert abs(draws.mean().item() - exact) < 4 * draws.std().item() / math.sqrt(len(draws))
    assert draws.std().item() > 0.1  # the analytic-KL path really ran (the trace ELBO here has zero variance)


def test_unknown_objective_names_the_choices():
    with pytest.raises(ValueError, match="trace, meanfield or iwae"):
        make_elbo("elbo2")
