"""Tests of experiments.evaluation.importance: the importance-sampled log p(x) against PPCA closed forms,
and the refit of a per-point guide on test points."""

from __future__ import annotations

import math

import pytest
import torch

from vae_priors.experiments.config import SVIConfig
from vae_priors.experiments.data.datasets import Split
from vae_priors.experiments.evaluation.importance import evaluate
from vae_priors.experiments.evaluation.log_weights import log_weights
from vae_priors.experiments.registry import Pair, get_variant
from vae_priors.experiments.training.svi import fit
from vae_priors.models.linear_gaussian import ExactPosteriorGuide


def test_exact_posterior_guide_gives_the_exact_log_marginal_and_elbo(ppca, ppca_x):
    result = evaluate(Pair(ppca.model(), ExactPosteriorGuide(ppca)), Split(ppca_x), num_particles=5)
    exact = ppca.log_marginal(ppca_x)
    torch.testing.assert_close(result.per_point_log_likelihood(), exact, atol=1e-4, rtol=0)
    torch.testing.assert_close(result.per_point_elbo(), exact, atol=1e-4, rtol=0)
    summary = result.summary()
    assert summary["test_log_lik"] == pytest.approx(exact.mean().item(), abs=1e-4)
    assert summary["test_log_lik_se"] == pytest.approx(exact.std().item() / math.sqrt(len(exact)), rel=1e-3)
    assert result.note == ""


def test_importance_sampled_log_likelihood_is_within_monte_carlo_error_of_the_closed_form(ppca, ppca_x):
    """A too-wide guide: the ELBO is strictly below log p(x), the K-sample estimate within its own error of it."""
    k = 2000
    result = evaluate(Pair(ppca.model(), ExactPosteriorGuide(ppca, scale_factor=1.4)), Split(ppca_x), num_particles=k)
    exact = ppca.log_marginal(ppca_x)
    estimate = result.per_point_log_likelihood()
    # delta method: sd(log mean w) ~= sd(w) / (sqrt(K) mean(w)), computed from the weights themselves
    w = (result.weights.log_w.double() - result.weights.log_w.double().max(0).values).exp()
    se = w.std(0) / (math.sqrt(k) * w.mean(0))
    assert ((estimate - exact).abs() < 5 * se + 1e-4).all()
    gap = exact - result.per_point_elbo()
    assert (gap > 0.05).all()  # the test would notice if the estimate were just the ELBO
    assert abs((estimate - exact).mean().item()) < 0.1 * gap.mean().item()


def test_local_guide_is_refitted_on_test_points_with_the_model_frozen(digits300, small_model_config):
    pair = get_variant("vae-local-guide").factory(digits300, small_model_config, "bernoulli")
    fit(pair, digits300, SVIConfig(epochs=2, batch_size=100, lr=1e-2, patience=10), seed=0)
    test = digits300.test
    model_before = {k: v.clone() for k, v in pair.model.state_dict().items()}
    unfitted = pair.guide.for_new_points(len(test))
    torch.manual_seed(0)
    elbo_unfitted = log_weights(pair.model, unfitted, test.tensors(), 20).log_w.mean().item()
    result = evaluate(pair, test, num_particles=20, local_refit_steps=150, seed=0)
    assert "refitted on the 100 test points" in result.note
    assert result.guide is not pair.guide and result.guide.num_points == len(test)
    assert result.summary()["test_elbo"] > elbo_unfitted + 1.0
    for name, value in pair.model.state_dict().items():
        assert torch.equal(value, model_before[name]), f"{name} changed during the refit"
    assert all(p.requires_grad for p in pair.model.parameters())
