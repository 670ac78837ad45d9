"""Held-out likelihood of the decoder under other latent sources, against the linear-Gaussian closed form."""

from __future__ import annotations

import pyro.distributions as dist
import pytest
import torch

from vae_priors.experiments.diagnostics.latent_sources import source_log_likelihoods
from vae_priors.models.linear_gaussian import ExactPosteriorGuide


def closed_form(ppca, x, loc, cov):
    """log p_s(x) for s = N(loc, cov): x ~ N(W loc + b, W cov W^T + sigma^2 I)."""
    w = ppca.weight.double()
    marginal = w @ cov @ w.T + ppca.sigma**2 * torch.eye(ppca.x_dim, dtype=torch.float64)
    return dist.MultivariateNormal(w @ loc + ppca.bias.double(), covariance_matrix=marginal).log_prob(x.double())


def test_each_source_matches_the_closed_form_marginal_and_the_prior_is_exact(ppca, ppca_x):
    loc = torch.tensor([0.5, -0.3], dtype=torch.float64)
    cov = torch.tensor([[0.8, 0.2], [0.2, 0.6]], dtype=torch.float64)
    shifted = dist.MultivariateNormal(loc.float(), covariance_matrix=cov.float())
    out = source_log_likelihoods(ppca.model(), ExactPosteriorGuide(ppca), ppca_x, {"shifted": shifted.log_prob},
                                 num_particles=4000, seed=0)
    # The exact posterior under N(0, I) makes every weight of the "prior" source equal p(x): no Monte Carlo error.
    assert torch.allclose(out["prior"], ppca.log_marginal(ppca_x), atol=1e-4)
    # Another source: an importance-sampling estimate with a proposal that is not its posterior.
    error = out["shifted"] - closed_form(ppca, ppca_x, loc, cov)
    assert error.abs().mean() < 0.02, error.abs().mean()
    # And the difference to the prior is a real one, not an estimator artifact.
    assert (out["shifted"] - out["prior"]).abs().mean() > 0.1


def test_scores_are_reproducible_by_seed(ppca, ppca_x):
    source = {"wide": dist.MultivariateNormal(torch.zeros(2), 2 * torch.eye(2)).log_prob}
    guide = ExactPosteriorGuide(ppca, 0.7)
    a = source_log_likelihoods(ppca.model(), guide, ppca_x, source, num_particles=50, seed=3)
    b = source_log_likelihoods(ppca.model(), guide, ppca_x, source, num_particles=50, seed=3)
    assert torch.equal(a["wide"], b["wide"]) and a.keys() == {"prior", "wide"}
    c = source_log_likelihoods(ppca.model(), guide, ppca_x, source, num_particles=50, seed=4)
    assert not torch.equal(a["wide"], c["wide"])


@pytest.mark.parametrize("num_particles", [1, 7])
def test_one_value_per_test_point(ppca, ppca_x, num_particles):
    out = source_log_likelihoods(ppca.model(), ExactPosteriorGuide(ppca), ppca_x, {}, num_particles=num_particles)
    assert out["prior"].shape == (ppca_x.shape[0],) and out["prior"].dtype == torch.float64
