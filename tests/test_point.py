"""Per-point diagnostics against the closed forms of linear-Gaussian pairs (issue 3, "Correctness")."""

import numpy as np
import pytest
import torch

from vae_priors.experiments.data.synthetic import (
    conditional_linear_gaussian_parameters,
    linear_gaussian_dataset,
    linear_gaussian_parameters,
    sample_conditional,
)
from vae_priors.experiments.diagnostics.point import inference_arrays, khat_threshold, point_diagnostics
from vae_priors.experiments.registry import Pair
from vae_priors.guides.local_normal import LocalNormalGuide
from vae_priors.models.linear_gaussian import ExactConditionalGuide, ExactPosteriorGuide


@pytest.fixture(scope="module")
def ppca_setup():
    ppca = linear_gaussian_parameters(x_dim=6, latent_dim=3, posterior_variances=[0.3, 0.5, 0.7])
    test = linear_gaussian_dataset(ppca, num_train=10, num_val=10, num_test=200).test
    return ppca, test, ppca.log_marginal(test.x).numpy()


def _diagnose(ppca, split, scale_factor, **kwargs):
    return point_diagnostics(Pair(ppca.model(), ExactPosteriorGuide(ppca, scale_factor)), split, 1000, **kwargs)


def test_exact_guide_importance_log_lik_within_0_05_nat_and_good_khat(ppca_setup):
    ppca, test, exact = ppca_setup
    d = _diagnose(ppca, test, 1.0)
    assert np.abs(d.log_lik_is - exact).max() < 0.05
    assert np.abs(d.log_lik_psis - exact).max() < 0.05
    assert (d.khat < 0.5).mean() >= 0.95


def test_wider_guide_importance_log_lik_within_0_05_nat_and_good_khat(ppca_setup):
    # 1.2x the exact scale: weights vary (unlike the exact guide) but have light tails.
    ppca, test, exact = ppca_setup
    d = _diagnose(ppca, test, 1.2)
    assert np.abs(d.log_lik_is - exact).max() < 0.05
    assert (d.khat < 0.5).mean() >= 0.95
    assert (d.elbo < exact).all()


def test_too_narrow_guide_has_large_khat_and_elbo_strictly_below_log_marginal(ppca_setup):
    ppca, test, exact = ppca_setup
    d = _diagnose(ppca, test, 0.3)
    assert (d.khat > 0.7).mean() > 0.5
    assert (d.elbo < exact).all()
    assert d.summary()["share_khat_bad"] > 0.5


def test_analytic_kl_per_point_and_dimension_match_the_gaussian_closed_form(ppca_setup):
    ppca, test, _ = ppca_setup
    d = _diagnose(ppca, test, 1.0)
    mu, var = ppca.posterior_loc(test.x).double(), torch.tensor([0.3, 0.5, 0.7], dtype=torch.float64)
    per_dim = 0.5 * (var + mu**2 - 1 - var.log())
    assert d.kl_analytic
    np.testing.assert_allclose(d.kl_per_dim, per_dim.numpy(), atol=1e-5)
    np.testing.assert_allclose(d.kl, per_dim.sum(-1).numpy(), atol=1e-5)


def test_conditional_pair_gives_exact_log_p_y_given_x_and_prior_kl_to_standard_normal():
    params = conditional_linear_gaussian_parameters()
    split = sample_conditional(params, 100)
    pair = Pair(params.model(), ExactConditionalGuide(params, 1.2), conditional=True)
    d = point_diagnostics(pair, split, 1000)
    np.testing.assert_allclose(d.log_lik_is, params.log_conditional(split.x, split.y).numpy(), atol=0.05)
    np.testing.assert_allclose(d.kl_prior_standard, params.kl_prior_standard(split.x).numpy(), atol=1e-5)
    assert not d.kl_analytic  # full-covariance q vs diagonal p(z|x): not in torch's KL registry -> Monte Carlo


def test_per_point_guide_reads_its_own_parameters_in_every_chunk(ppca_setup):
    # A local guide set to each point's exact posterior must give log w = log p(x_n) for all points, even when the
    # points are split into many chunks (small max_elements).
    ppca, test, exact = ppca_setup
    guide = LocalNormalGuide(len(test), 3)
    with torch.no_grad():
        guide.loc.copy_(ppca.posterior_loc(test.x))
        guide.raw_scale.copy_(torch.tensor([0.3, 0.5, 0.7]).sqrt().sub(1e-3).expm1().log().expand(len(test), 3))
    d = point_diagnostics(Pair(ppca.model(), guide), test, 100, max_elements=100 * 6 * 16, guide=guide)
    np.testing.assert_allclose(d.log_lik_is, exact, atol=1e-3)


def test_inference_arrays_have_draws_by_points_by_latents(ppca_setup):
    ppca, test, _ = ppca_setup
    guide = ExactPosteriorGuide(ppca)
    arrays = inference_arrays(Pair(ppca.model(), guide), test, torch.tensor([3, 7]), 50, guide)
    assert arrays["z_posterior"].shape == arrays["z_prior"].shape == (50, 2, 3)
    assert arrays["log_w"].shape == (50, 2) and arrays["observed"].shape == (2, 6)


def test_khat_threshold_follows_the_sample_size_rule():
    assert khat_threshold(100) == pytest.approx(0.5)
    assert khat_threshold(1000) == pytest.approx(2 / 3)
    assert khat_threshold(10**6) == pytest.approx(0.7)


def _gaussian_q_of_conditional(params, guide_scale, split):
    """The exact guide's q(z|x,y) = N(m_q, s^2 Cov) and p(z|x) = N(F x + c, diag tau^2) as explicit tensors."""
    guide = ExactConditionalGuide(params, guide_scale)
    precision = torch.diag(params.tau.double() ** -2) + params.b_matrix.double().T @ params.b_matrix.double() / \
        params.sigma**2
    cov = torch.linalg.inv(precision) * guide_scale**2
    prior_term = params.prior_loc(split.x.double()) / params.tau.double() ** 2
    data_term = (split.y.double() - split.x.double() @ params.e_matrix.double().T - params.bias.double()) @ \
        params.b_matrix.double() / params.sigma**2
    m_q = (prior_term + data_term) @ (torch.linalg.inv(precision)).T
    return guide, m_q, cov


def test_conditional_rate_reverse_kl_and_holes_match_the_gaussian_closed_forms():
    # One latent dimension: every quantity has a closed form in the normal CDF.
    params = conditional_linear_gaussian_parameters(x_dim=2, latent_dim=1, y_dim=3, noise=0.7, seed=1)
    split = sample_conditional(params, 60, seed=2)
    guide, m_q, var_q = _gaussian_q_of_conditional(params, 1.0, split)
    d = point_diagnostics(Pair(params.model(), guide, conditional=True), split, 200, hole_draws=4000)
    m_p, s_p = params.prior_loc(split.x.double())[:, 0], params.tau.double()[0]
    m_q, s_q = m_q[:, 0], var_q[0, 0].sqrt()
    kl = lambda m1, s1, m2, s2: torch.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5  # noqa: E731
    np.testing.assert_allclose(d.kl, kl(m_q, s_q, m_p, s_p).numpy(), rtol=1e-4, atol=1e-5)  # the rate
    np.testing.assert_allclose(d.kl_prior_guide, kl(m_p, s_p, m_q, s_q).numpy(), rtol=1e-4, atol=1e-5)
    # z ~ p lands where log q is below its 1 % quantile: |z - m_q| > c s_q with c the 99.5 % normal quantile.
    normal = torch.distributions.Normal(0.0, 1.0)
    c = normal.icdf(torch.tensor(0.995)).double()
    exact = normal.cdf((m_q - c * s_q - m_p) / s_p) + 1 - normal.cdf((m_q + c * s_q - m_p) / s_p)
    assert abs(d.conditional_hole_share.mean() - exact.mean().item()) < 0.01
    assert np.corrcoef(d.conditional_hole_share, exact.numpy())[0, 1] > 0.9


def test_a_guide_equal_to_the_prior_has_zero_rate_and_one_percent_holes():
    params = conditional_linear_gaussian_parameters(x_dim=2, latent_dim=2, y_dim=3, seed=3)
    split = sample_conditional(params, 40)

    class PriorAsGuide(torch.nn.Module):  # GSNN-style: q(z|x,y) = p(z|x)
        def forward(self, x, y=None):
            import pyro

            from vae_priors.models.plate import data_plate

            with data_plate(x.shape[0]):
                return pyro.sample("z", params.model().prior(x))

    d = point_diagnostics(Pair(params.model(), PriorAsGuide(), conditional=True), split, 100, hole_draws=2000)
    assert np.abs(d.kl).max() < 1e-6 and np.abs(d.kl_prior_guide).max() < 1e-6
    assert abs(d.conditional_hole_share.mean() - 0.01) < 0.005
