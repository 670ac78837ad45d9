"""Latent samplers and generic decoding: shapes, reproducibility and moments against closed forms."""

from __future__ import annotations

import pyro.distributions as dist
import pytest
import torch
from torch import nn

from vae_priors.experiments.config import ModelConfig
from vae_priors.experiments.data.datasets import load_digits
from vae_priors.experiments.diagnostics import generation
from vae_priors.experiments.diagnostics.generation import (
    AggregatePosteriorSampler,
    GaussianMixtureSampler,
    PriorSampler,
    decode,
)
from vae_priors.experiments.registry import get_variant


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def _pair(data, name="vae", latent_dim=2):
    torch.manual_seed(0)
    return get_variant(name).factory(data, ModelConfig(latent_dim=latent_dim, hidden=[16]), "bernoulli")


class ShiftedPrior(nn.Module):
    """p(z) = N(3, 2^2) per dimension: a prior that is not N(0, I), read only through the model's trace."""

    def forward(self, batch):
        return dist.Normal(torch.full((batch.shape[0], 2), 3.0), torch.full((batch.shape[0], 2), 2.0)).to_event(1)


def test_prior_sampler_draws_from_the_models_own_z_site(digits):
    pair = _pair(digits)
    pair.model.prior = ShiftedPrior()
    z = PriorSampler(pair.model, digits.x_dim).sample(20000, seed=1)
    assert z.shape == (20000, 2)
    assert torch.allclose(z.mean(0), torch.tensor([3.0, 3.0]), atol=0.06)
    assert torch.allclose(z.std(0), torch.tensor([2.0, 2.0]), atol=0.06)


def test_samplers_are_reproducible_by_seed(digits):
    pair = _pair(digits)
    sampler = PriorSampler(pair.model, digits.x_dim)
    assert torch.equal(sampler.sample(5, seed=3), sampler.sample(5, seed=3))
    assert not torch.equal(sampler.sample(5, seed=3), sampler.sample(5, seed=4))


def test_q_agg_sampler_matches_the_two_component_mixture_moments():
    loc = torch.tensor([[-2.0, 0.0], [3.0, 1.0]])
    scale = torch.tensor([[0.5, 1.0], [1.0, 0.2]])
    z = AggregatePosteriorSampler(dist.Normal(loc, scale).to_event(1)).sample(200_000, seed=0)
    mean = loc.mean(0)  # equal weights 1/N
    var = (scale**2 + loc**2).mean(0) - mean**2
    assert z.shape == (200_000, 2)
    assert torch.allclose(z.mean(0), mean, atol=4 * (var / 200_000).sqrt().max().item())
    assert torch.allclose(z.var(0), var, rtol=0.02)
    # the mixture is bimodal in dim 0: half the draws on each side of the midpoint 0.5
    assert abs((z[:, 0] < 0.5).float().mean().item() - 0.5) < 0.01


def test_gmm_sampler_reproduces_the_moments_of_the_encodings_it_was_fitted_to():
    # An EM fixed point of a full-covariance mixture has the sample mean and covariance of its data.
    g = torch.Generator().manual_seed(0)
    means = torch.cat([torch.randn(300, 3, generator=g) * 0.3 - 2, torch.randn(200, 3, generator=g) + 2])
    sampler = GaussianMixtureSampler(means, num_components=2, seed=0)
    z = sampler.sample(200_000, seed=1)
    assert "2-component full-covariance" in sampler.description
    assert torch.allclose(z.mean(0), means.mean(0), atol=0.02)
    assert torch.allclose(torch.cov(z.T), torch.cov(means.T), atol=0.05)


def test_gmm_sampler_uses_one_component_for_identical_encodings():
    sampler = GaussianMixtureSampler(torch.ones(50, 2), seed=0)
    assert sampler.num_components == 1
    assert torch.allclose(sampler.sample(100, seed=0), torch.ones(100, 2), atol=0.01)


def test_decode_returns_the_likelihood_mean_at_the_given_z(digits):
    pair = _pair(digits)
    z = torch.randn(7, 2)
    decoded = decode(pair.model, z, (torch.zeros(7, digits.x_dim),))
    assert torch.allclose(decoded.mean, torch.sigmoid(pair.model.decoder(z)))
    assert decoded.draw.shape == (7, digits.x_dim) and set(decoded.draw.unique().tolist()) <= {0.0, 1.0}
    without_inputs = decode(pair.model, z, x_dim=digits.x_dim)  # no dummy x needed
    assert torch.equal(without_inputs.mean, decoded.mean) and torch.equal(without_inputs.draw, decoded.draw)
    with pytest.raises(ValueError, match="x_dim"):
        decode(pair.model, z)


def test_generate_gives_every_source_the_requested_shape(digits):
    pair = _pair(digits)
    components = pair.guide.encode(digits.train.x[:100])
    samplers = generation.latent_samplers(pair.model, components, digits.x_dim)
    out = generation.generate(pair.model, samplers, digits.x_dim, num=9, seed=0)
    assert set(out) == {"prior", "q_agg", "gmm"}
    assert all(d.mean.shape == (9, digits.x_dim) and d.draw.shape == (9, digits.x_dim) for d in out.values())


def test_reconstruct_decodes_the_guide_mean(digits):
    pair = _pair(digits)
    x = digits.test.x[:4]
    expected = torch.sigmoid(pair.model.decoder(pair.guide.encode(x).mean))
    assert torch.allclose(generation.reconstruct(pair.model, pair.guide, (x,)), expected)


def test_predict_draws_y_from_the_conditional_prior(digits):
    from vae_priors.experiments.data.datasets import quadrant_task

    quads = quadrant_task(digits, 1)
    pair = _pair(quads, "cvae")
    x = quads.test.x[:5]
    y = generation.predict(pair.model, x, num_draws=3, seed=0)
    assert y.shape == (3, 5, quads.y_dim)
    assert not torch.equal(y[0], y[1])  # different z ~ p(z|x) per draw
