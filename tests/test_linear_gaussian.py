"""Closed forms of the linear-Gaussian pairs agree with the project's trace-based log weights and with sampling."""

import pytest
import torch

from vae_priors.experiments.config import DataConfig
from vae_priors.experiments.data.synthetic import (
    conditional_linear_gaussian_parameters,
    linear_gaussian_dataset,
    linear_gaussian_parameters,
    load_linear_gaussian,
    sample_conditional,
)
from vae_priors.experiments.evaluation.log_weights import log_weights
from vae_priors.models.linear_gaussian import ExactConditionalGuide, ExactPosteriorGuide


@pytest.fixture(scope="module")
def ppca():
    return linear_gaussian_parameters(x_dim=6, latent_dim=3, posterior_variances=[0.3, 0.5, 0.7])


def test_exact_guide_makes_every_log_weight_equal_the_closed_form_log_marginal(ppca):
    x = linear_gaussian_dataset(ppca, num_train=50, num_val=5, num_test=5).train.x
    weights = log_weights(ppca.model(), ExactPosteriorGuide(ppca), (x,), num_particles=20)
    # log p(x, z) - log q(z|x) = log p(x) for every z when q is the exact posterior.
    assert torch.allclose(weights.log_w.double(), ppca.log_marginal(x).expand(20, -1), atol=1e-4)


def test_orthogonal_columns_give_the_requested_diagonal_posterior(ppca):
    _, cov = ppca.posterior_parameters()
    assert torch.allclose(cov, torch.diag(torch.tensor([0.3, 0.5, 0.7])), atol=1e-5)
    guide = ExactPosteriorGuide(ppca, 0.3)
    scale = guide.encode(torch.zeros(2, 6)).base_dist.scale
    assert torch.allclose(scale[0], 0.3 * torch.tensor([0.3, 0.5, 0.7]).sqrt(), atol=1e-6)


def test_conditional_exact_guide_log_weights_equal_closed_form_log_p_y_given_x():
    params = conditional_linear_gaussian_parameters()
    split = sample_conditional(params, 40)
    weights = log_weights(params.model(), ExactConditionalGuide(params), (split.x, split.y), num_particles=20)
    exact = params.log_conditional(split.x, split.y)
    assert torch.allclose(weights.log_w.double(), exact.expand(20, -1), atol=1e-4)


def test_aggregate_closed_form_matches_sampled_encodings(ppca):
    # Sigma_agg = A C A^T + S, checked against Cov_x(E_q[z|x]) + S over 200k draws x ~ p(x).
    x = linear_gaussian_dataset(ppca, num_train=200_000, num_val=5, num_test=5).train.x
    q = ExactPosteriorGuide(ppca, 0.5).encode(x)
    agg = torch.cov(q.mean.double().T) + torch.diag(q.variance[0].double())
    sampled_kl = 0.5 * (torch.trace(agg) - 3 - torch.logdet(agg))
    assert ppca.aggregate_closed_form(0.5)["kl_qagg_p"] == pytest.approx(float(sampled_kl), abs=0.005)


def test_exact_moments_make_sample_mean_and_covariance_equal_the_population(ppca):
    x = linear_gaussian_dataset(ppca, num_train=100, num_val=20, num_test=20, exact_moments=True).train.x.double()
    centred = x - x.mean(0)
    assert torch.allclose(x.mean(0), ppca.bias.double(), atol=1e-5)
    assert torch.allclose(centred.T @ centred / 100, ppca.marginal_covariance().double(), atol=1e-5)


def test_linear_gaussian_loader_rejects_binarization_with_a_fix():
    with pytest.raises(ValueError, match='binarize = "none"'):
        load_linear_gaussian(DataConfig(name="linear-gaussian", binarize="static", likelihood="gaussian"))
    data = load_linear_gaussian(DataConfig(name="linear-gaussian", binarize="none", likelihood="gaussian"))
    assert data.x_dim == 8 and len(data.train) == 2000
