"""Shared fixtures: a small binarized digits set, small nets, and a linear-Gaussian (PPCA) pair with exact answers."""

from __future__ import annotations

from dataclasses import replace

import pyro
import pytest
import torch

from vae_priors.experiments.config import ModelConfig
from vae_priors.experiments.data.datasets import Dataset, binarize, load_digits
from vae_priors.experiments.data.synthetic import linear_gaussian_parameters, sample_ppca
from vae_priors.models.linear_gaussian import PPCA

# The test nets are tiny: one thread is faster than two, and avoids OpenMP spinning when cores are shared.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _fresh_seed_and_empty_param_store():
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    yield


@pytest.fixture(scope="session")
def digits300() -> Dataset:
    """Statically binarized 8x8 digits cut to 300 / 100 / 100 points."""
    data = binarize(load_digits(), "static")
    cut = lambda split, n: replace(split, x=split.x[:n], labels=split.labels[:n])  # noqa: E731
    return replace(data, train=cut(data.train, 300), val=cut(data.val, 100), test=cut(data.test, 100))


@pytest.fixture
def small_model_config() -> ModelConfig:
    return ModelConfig(latent_dim=4, hidden=[32], num_pseudo_inputs=20)


@pytest.fixture(scope="session")
def ppca() -> PPCA:
    """z ~ N(0, I_2), x | z ~ N(W z + b, 0.5^2 I_5), W with orthogonal columns (diagonal exact posterior)."""
    return linear_gaussian_parameters(x_dim=5, latent_dim=2, noise=0.5, posterior_variances=[0.3, 0.7], seed=3)


@pytest.fixture(scope="session")
def ppca_x(ppca: PPCA) -> torch.Tensor:
    """60 draws from the PPCA model."""
    return sample_ppca(ppca, 60, seed=4)
