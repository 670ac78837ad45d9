"""Aggregated-posterior diagnostics against closed forms (PPCA) and a brute-force float64 loop."""

import math

import numpy as np
import pyro.distributions as dist
import pytest
import torch

from vae_priors.experiments.config import ModelConfig, SVIConfig
from vae_priors.experiments.data.synthetic import linear_gaussian_dataset, linear_gaussian_parameters
from vae_priors.experiments.diagnostics.aggregate import (
    aggregate_diagnostics,
    log_q_agg,
    posterior_components,
    sample_q_agg,
)
from vae_priors.experiments.registry import Pair, get_variant
from vae_priors.experiments.training.svi import fit
from vae_priors.guides.local_normal import LocalNormalGuide
from vae_priors.models.linear_gaussian import ExactPosteriorGuide


def _brute_force_log_q_agg(z, locs, covs):
    out = []
    for zm in z.double().numpy():
        terms = []
        for loc, cov in zip(locs.double().numpy(), covs.double().numpy(), strict=True):
            diff = zm - loc
            _, logdet = np.linalg.slogdet(cov)
            terms.append(-0.5 * (diff @ np.linalg.solve(cov, diff) + logdet + len(zm) * math.log(2 * math.pi)))
        top = max(terms)
        out.append(top + math.log(sum(math.exp(t - top) for t in terms)) - math.log(len(terms)))
    return np.array(out)


@pytest.mark.parametrize("full_covariance", [False, True])
def test_log_q_agg_equals_a_brute_force_float64_loop(full_covariance):
    g = torch.Generator().manual_seed(0)
    locs, z = torch.randn(30, 3, generator=g), 2 * torch.randn(20, 3, generator=g)
    scales = 0.2 + torch.rand(30, 3, generator=g)
    if full_covariance:
        tril = torch.diag_embed(scales) + torch.tril(0.3 * torch.randn(30, 3, 3, generator=g), -1)
        comps, covs = dist.MultivariateNormal(locs, scale_tril=tril), tril @ tril.transpose(-1, -2)
    else:
        comps, covs = dist.Normal(locs, scales).to_event(1), torch.diag_embed(scales**2)
    expected = _brute_force_log_q_agg(z, locs, covs)
    np.testing.assert_allclose(log_q_agg(z, comps).numpy(), expected, atol=1e-5)
    # Tiny blocks: chunked over both draws and components, same answer.
    np.testing.assert_allclose(log_q_agg(z, comps, chunk_elements=7).numpy(), expected, atol=1e-5)


def test_sample_q_agg_picks_components_uniformly_and_draws_from_them():
    comps = dist.Normal(torch.tensor([[-10.0], [10.0]]), torch.tensor([[1.0], [2.0]])).to_event(1)
    z = sample_q_agg(comps, 20_000, seed=1)[:, 0]
    left, right = z[z < 0], z[z > 0]
    assert len(left) / len(z) == pytest.approx(0.5, abs=0.02)
    assert float(left.mean()) == pytest.approx(-10, abs=0.05) and float(right.std()) == pytest.approx(2, abs=0.05)
    assert torch.equal(z, sample_q_agg(comps, 20_000, seed=1)[:, 0])


@pytest.fixture(scope="module")
def narrow_ppca_aggregate():
    # Posterior variances near 1 and a 0.3x guide: KL(q_agg || p) is large and the N components overlap, so the
    # finite mixture is close to its Gaussian population limit; exact_moments removes sampling error in the data.
    ppca = linear_gaussian_parameters(x_dim=5, latent_dim=2, posterior_variances=[0.85, 0.9])
    train = linear_gaussian_dataset(ppca, num_train=2000, num_val=10, num_test=10, exact_moments=True).train
    result = aggregate_diagnostics(Pair(ppca.model(), ExactPosteriorGuide(ppca, 0.3)), train, 20_000, seed=0)
    return result, ppca.aggregate_closed_form(0.3)


def test_mutual_information_and_kl_qagg_within_2_percent_of_closed_forms(narrow_ppca_aggregate):
    result, closed = narrow_ppca_aggregate
    assert result.mean_kl == pytest.approx(closed["mean_kl"], rel=1e-5)  # analytic KL, exact data moments
    assert result.kl_qagg_p == pytest.approx(closed["kl_qagg_p"], rel=0.02)
    assert result.mutual_info == pytest.approx(closed["mutual_info"], rel=0.02)
    assert result.mutual_info <= result.log_n


def test_surgery_identity_holds_to_monte_carlo_error(narrow_ppca_aggregate):
    result, _ = narrow_ppca_aggregate
    assert result.shared_prior
    assert abs(result.surgery_residual) < 4 * result.surgery_residual_se
    assert result.mutual_info_direct == pytest.approx(result.mutual_info, abs=4 * result.mutual_info_direct_se)


def test_exact_guide_aggregate_is_the_prior():
    ppca = linear_gaussian_parameters(x_dim=5, latent_dim=2, posterior_variances=[0.5, 0.8])
    train = linear_gaussian_dataset(ppca, num_train=2000, num_val=10, num_test=10, exact_moments=True).train
    result = aggregate_diagnostics(Pair(ppca.model(), ExactPosteriorGuide(ppca)), train, 20_000, seed=0)
    closed = ppca.aggregate_closed_form(1.0)
    assert closed["kl_qagg_p"] == pytest.approx(0.0, abs=1e-9)
    assert result.kl_qagg_p < 0.01 and result.kl_p_qagg < 0.01
    assert result.mutual_info == pytest.approx(closed["mutual_info"], rel=0.02)
    assert result.prior_hole_share == pytest.approx(0.01, abs=0.005)  # q_agg = p: 1 % by construction
    assert result.active_units == 2 and result.collapsed_dims == []


def test_posterior_components_of_a_per_point_guide_use_each_points_parameters():
    guide = LocalNormalGuide(10, 2)
    with torch.no_grad():
        guide.loc.copy_(torch.arange(20.0).reshape(10, 2))
    comps = posterior_components(guide, (torch.zeros(10, 3),), batch_size=3)
    assert torch.equal(comps.mean, guide.loc.detach())


def test_constant_guide_on_digits_has_no_information_and_no_active_units(digits300):
    pair = get_variant("vae-constant-guide").factory(digits300, ModelConfig(latent_dim=4, hidden=[32]), "bernoulli")
    fit(pair, digits300, SVIConfig(epochs=3, batch_size=100, lr=1e-2), progress=False)
    result = aggregate_diagnostics(pair, digits300.train, 5000, seed=0)
    assert result.mutual_info == pytest.approx(0.0, abs=4 * result.mutual_info_se + 1e-9)
    assert result.mutual_info_direct == pytest.approx(0.0, abs=1e-6)  # every component is the same
    assert result.active_units == 0

