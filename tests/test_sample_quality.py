"""Sample scores: the Frechet distance against closed forms, class coverage, and the classifier cache."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from vae_priors.experiments.data.datasets import Split, load_digits
from vae_priors.experiments.diagnostics import sample_quality
from vae_priors.experiments.diagnostics.sample_quality import (
    class_coverage,
    frechet_distance,
    load_or_train_classifier,
    score_samples,
)


def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    s1, s2 = np.array([1.0, 0.5, 2.0]), np.array([0.3, 1.5, 2.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((s1 - s2) ** 2)  # W2^2 of commuting Gaussians
    assert frechet_distance(mu1, np.diag(s1**2), mu2, np.diag(s2**2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_is_invariant_to_a_common_rotation():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    s1, s2 = np.array([1.0, 2.0, 0.1, 3.0]), np.array([0.5, 2.5, 1.0, 1.0])
    c1, c2 = q @ np.diag(s1**2) @ q.T, q @ np.diag(s2**2) @ q.T
    assert frechet_distance(np.zeros(4), c1, np.zeros(4), c2) == pytest.approx(np.sum((s1 - s2) ** 2), rel=1e-8)


def test_frechet_distance_agrees_with_scipy_sqrtm_for_non_commuting_covariances():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    c1, c2 = a @ a.T + 0.1 * np.eye(5), b @ b.T + 0.1 * np.eye(5)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    reference = np.sum((mu1 - mu2) ** 2) + np.trace(c1 + c2 - 2 * scipy.linalg.sqrtm(c1 @ c2).real)
    assert frechet_distance(mu1, c1, mu2, c2) == pytest.approx(reference, rel=1e-6)
    assert frechet_distance(mu1, c1, mu1, c1) == pytest.approx(0.0, abs=1e-8)


def test_class_coverage_counts_classes_above_half_the_uniform_share():
    # 4 classes: threshold 1/8 of 40 samples = 5; class 2 has 5 (counts), class 3 has 4 (does not)
    predicted = torch.tensor([0] * 16 + [1] * 15 + [2] * 5 + [3] * 4)
    assert class_coverage(predicted, 4) == 0.75
    assert class_coverage(torch.zeros(10, dtype=torch.long), 10) == 0.1


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def test_classifier_is_cached_and_the_second_call_loads_it(digits, tmp_path, monkeypatch):
    net, note = load_or_train_classifier(digits.train, tmp_path, "digits")
    assert "trained" in note and len(list(tmp_path.glob("classifier-digits-*.pt"))) == 1
    accuracy = (net(digits.test.x).argmax(-1) == digits.test.labels).float().mean().item()
    assert accuracy > 0.85

    def no_training(*args, **kwargs):
        raise AssertionError("the cached classifier should be loaded, not retrained")

    monkeypatch.setattr(sample_quality, "train_classifier", no_training)
    again, note = load_or_train_classifier(digits.train, tmp_path, "digits")
    assert "loaded" in note
    assert torch.equal(again(digits.test.x[:5]), net(digits.test.x[:5]))


def test_unlabelled_data_gets_no_classifier_and_a_reason(tmp_path):
    net, note = load_or_train_classifier(Split(torch.rand(10, 4)), tmp_path, "binarized-mnist")
    assert net is None and "no class labels" in note
    assert not any(tmp_path.iterdir())


def test_test_split_scores_better_than_noise(digits, tmp_path):
    net, _ = load_or_train_classifier(digits.train, tmp_path, "digits")
    real = score_samples(net, digits.val.x, digits.test.x)
    noise = score_samples(net, torch.rand(180, digits.x_dim), digits.test.x)
    assert real.frechet < noise.frechet
    assert real.coverage == 1.0 and real.max_prob > noise.max_prob
    assert noise.frechet - real.frechet > 5 * (real.frechet_se**2 + noise.frechet_se**2) ** 0.5


def test_frechet_standard_error_shrinks_with_more_samples_like_one_over_root_n(digits, tmp_path):
    net, _ = load_or_train_classifier(digits.train, tmp_path, "digits")
    few = score_samples(net, digits.train.x[:150], digits.test.x, bootstrap=100)
    many = score_samples(net, digits.train.x[:1200], digits.test.x, bootstrap=100)
    assert few.frechet_se > 0 and many.frechet_se > 0
    assert 1.5 < few.frechet_se / many.frechet_se < 5.5  # sqrt(8) = 2.8, with bootstrap noise
    assert few.max_prob_se > many.max_prob_se
