"""Tests of experiments.evaluation.log_weights: shapes, chunking, the one-latent-site contract, PPCA closed forms."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from vae_priors.experiments.evaluation.log_weights import chunk_size, log_weights
from vae_priors.models.linear_gaussian import ExactPosteriorGuide
from vae_priors.models.plate import data_plate


def test_log_weights_have_shape_draws_by_points_and_z_has_a_latent_axis(ppca, ppca_x):
    weights, z = log_weights(ppca.model(), ExactPosteriorGuide(ppca, 1.5), (ppca_x,), 7, return_z=True)
    for t in (weights.log_q, weights.log_p_z, weights.log_lik, weights.log_w):
        assert t.shape == (7, len(ppca_x))
    assert z.shape == (7, len(ppca_x), ppca.latent_dim)


def test_each_term_is_the_log_density_of_the_returned_draws(ppca, ppca_x):
    guide = ExactPosteriorGuide(ppca, 1.5)
    weights, z = log_weights(ppca.model(), guide, (ppca_x,), 4, max_elements=40, return_z=True)
    z64, x64 = z.double(), ppca_x.double()
    normal = torch.distributions.Normal
    torch.testing.assert_close(weights.log_p_z.double(), normal(0.0, 1.0).log_prob(z64).sum(-1), atol=1e-4, rtol=0)
    loc = z64 @ ppca.weight.double().T + ppca.bias.double()
    torch.testing.assert_close(weights.log_lik.double(), normal(loc, ppca.sigma).log_prob(x64).sum(-1),
                               atol=1e-4, rtol=0)
    torch.testing.assert_close(weights.log_q, guide.encode(ppca_x).log_prob(z), atol=1e-4, rtol=0)


def test_chunks_keep_points_aligned_with_their_exact_log_marginal(ppca, ppca_x):
    """Under the exact posterior every weight is p(x_n), so any misaligned or dropped chunk would show."""
    exact = ppca.log_marginal(ppca_x).float()
    guide = ExactPosteriorGuide(ppca)
    assert chunk_size(3, ppca.x_dim, max_elements=3 * 5 * 7) == 7  # 60 points -> 9 chunks, the last one short
    for max_elements in (3 * 5 * 7, 2**24):
        log_w = log_weights(ppca.model(), guide, (ppca_x,), 3, max_elements=max_elements).log_w
        torch.testing.assert_close(log_w, exact.expand(3, -1), atol=1e-4, rtol=0)


def test_chunked_and_single_chunk_estimates_agree_within_monte_carlo_error(ppca, ppca_x):
    """Chunks draw in a different order, so the draws differ; the per-point means must agree statistically."""
    guide, s = ExactPosteriorGuide(ppca, 1.5), 400
    pyro.set_rng_seed(0)
    one = log_weights(ppca.model(), guide, (ppca_x,), s)
    pyro.set_rng_seed(0)
    many = log_weights(ppca.model(), guide, (ppca_x,), s, max_elements=s * ppca.x_dim * 8)
    for a, b in ((one.log_q, many.log_q), (one.log_lik, many.log_lik), (one.log_w, many.log_w)):
        se = torch.sqrt((a.var(0) + b.var(0)) / s)
        z_scores = (a.mean(0) - b.mean(0)) / se
        assert z_scores.abs().max() < 4.5
        assert z_scores.pow(2).mean() < 2.0  # about 1 if both are draws of the same estimator
    assert not torch.equal(one.log_q, many.log_q)


class ExtraLatentModel(nn.Module):
    """Breaks the contract: a second latent site "w" besides "z"."""

    def forward(self, x):
        with data_plate(x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], 2), 1.0).to_event(1))
            w = pyro.sample("w", dist.Normal(torch.zeros(x.shape[0], 1), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z.sum(-1, keepdim=True) + w, 1.0).to_event(1), obs=x)


class NormalGuide(nn.Module):
    def forward(self, x):
        with data_plate(x.shape[0]):
            pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], 2), 1.0).to_event(1))


def test_a_model_with_an_extra_latent_site_is_an_error_naming_it():
    with pytest.raises(ValueError, match=r"\['w'\].*one latent site 'z'"):
        log_weights(ExtraLatentModel(), NormalGuide(), (torch.zeros(4, 1),), 3)


def test_log_weights_leave_the_train_eval_mode_of_the_pair_as_it_was(ppca, ppca_x):
    model, guide = ppca.model(), ExactPosteriorGuide(ppca)
    model.train(), guide.eval()
    log_weights(model, guide, (ppca_x,), 2)
    assert model.training and not guide.training
