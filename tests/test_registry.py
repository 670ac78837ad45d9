"""Tests of experiments.registry: every registered variant follows the contract and learns, and a pair written
outside the registry runs through ``fit`` and ``evaluate`` with no other code."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from torch import nn

from vae_priors.experiments.config import SVIConfig
from vae_priors.experiments.data.datasets import Dataset, Split, quadrant_task
from vae_priors.experiments.evaluation.importance import evaluate
from vae_priors.experiments.registry import VARIANTS, Pair, get_variant, register
from vae_priors.experiments.training.svi import fit
from vae_priors.guides.amortized_normal import AmortizedNormalGuide
from vae_priors.models.likelihoods import GaussianLikelihood
from vae_priors.models.plate import data_plate


def _data_for(variant_name: str, digits300: Dataset) -> Dataset:
    return quadrant_task(digits300, 2) if VARIANTS[variant_name].conditional else digits300


@pytest.mark.parametrize("layer", ["relu", "gated"])
def test_every_registered_variant_follows_the_site_contract(digits300, small_model_config, layer):
    small_model_config.layer = layer
    small_model_config.pseudo_inputs = "reference" if layer == "gated" else "data"
    for name, variant in VARIANTS.items():
        data = _data_for(name, digits300)
        pair = variant.factory(data, small_model_config, "bernoulli")
        args = data.train.tensors(slice(0, 10))
        guide_trace = poutine.trace(pair.guide).get_trace(*args)
        model_trace = poutine.trace(poutine.replay(pair.model, trace=guide_trace)).get_trace(*args)
        for trace in (guide_trace, model_trace):
            site = trace.nodes["z"]
            assert site["fn"].event_shape == (small_model_config.latent_dim,), name
            assert site["fn"].batch_shape == (10,), name
            assert [f.name for f in site["cond_indep_stack"]] == ["data"], name
        observed = [s for s in model_trace.nodes.values() if s["type"] == "sample" and s["is_observed"]]
        assert len(observed) == 1 and observed[0]["cond_indep_stack"][0].dim == -1, name


@pytest.mark.parametrize("name", list(VARIANTS))
def test_registered_variant_improves_its_monitored_elbo(name, digits300, small_model_config):
    data = _data_for(name, digits300)
    pair = get_variant(name).factory(data, small_model_config, "bernoulli")
    result = fit(pair, data, SVIConfig(epochs=4, batch_size=50, lr=1e-2, patience=10), seed=0)
    trace = result.history[result.monitor]
    assert trace.notna().all() and len(trace) == 4
    assert trace.iloc[-1] > trace.iloc[0] + 0.5, f"{name}: {list(trace)}"
    assert result.best_elbo == trace.max()


def test_unknown_variant_lists_the_registered_ones():
    with pytest.raises(KeyError, match="vae-priors list"):
        get_variant("no-such-variant")


def test_registering_a_name_twice_is_an_error():
    with pytest.raises(ValueError, match="registered twice"):
        register("vae", "again")(lambda data, cfg, likelihood: None)


class StudentTLinearModel(nn.Module):
    """A pair no registry entry knows: z ~ StudentT_3(0, 1) (1-D), x | z ~ N(w z + b, diag s^2)."""

    def __init__(self, x_dim: int, df: float = 3.0):
        super().__init__()
        self.df = df
        self.decoder = nn.Linear(1, x_dim)
        self.likelihood = GaussianLikelihood(x_dim)

    def forward(self, x):
        with data_plate(x.shape[0], x.device):
            z = pyro.sample("z", dist.StudentT(self.df, torch.zeros(x.shape[0], 1), 1.0).to_event(1))
            return pyro.sample("x", self.likelihood(self.decoder(z)), obs=x)

    def log_marginal_by_quadrature(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x_n) = log int p(z) p(x_n|z) dz by a Riemann sum on a fine grid, float64.

        sum_d log N(x_d; w_d z + b_d, s_d) = -1/2 sum_d ((r_d - w_d z) / s_d)^2 - sum_d log(s_d sqrt(2 pi)),
        r = x - b: a quadratic in z, evaluated for all grid points and data points at once.
        """
        grid = torch.linspace(-40, 40, 40_001, dtype=torch.float64)
        w, b = (t.detach().double() for t in (self.decoder.weight[:, 0], self.decoder.bias))
        s = self.likelihood.scale.detach().double()
        r = (x.double() - b) / s  # (N, D)
        v = w / s
        quad = (r**2).sum(1)[None, :] - 2 * grid[:, None] * (r @ v)[None, :] + grid[:, None] ** 2 * (v @ v)
        log_lik = -0.5 * quad - torch.log(s * math.sqrt(2 * math.pi)).sum()
        log_prior = torch.distributions.StudentT(self.df).log_prob(grid)[:, None]
        return torch.logsumexp(log_prior + log_lik, 0) + math.log((grid[1] - grid[0]).item())


def test_a_new_pair_outside_the_registry_runs_through_fit_and_evaluate(small_model_config):
    g = torch.Generator().manual_seed(0)
    z = torch.distributions.StudentT(3.0).sample((400, 1))
    x = z @ torch.tensor([[1.5, -1.0, 0.5]]) + 0.3 * torch.randn(400, 3, generator=g)
    data = Dataset("student-t", Split(x[:200]), Split(x[200:300]), Split(x[300:]))
    pair = Pair(StudentTLinearModel(3), AmortizedNormalGuide(3, [16], 1))
    result = fit(pair, data, SVIConfig(epochs=8, batch_size=50, lr=2e-2, patience=20), seed=0)
    assert result.history.val_elbo.iloc[-1] > result.history.val_elbo.iloc[0] + 0.5
    evaluation = evaluate(pair, data.test, num_particles=500, seed=0)
    exact = pair.model.log_marginal_by_quadrature(data.test.x)
    estimate = evaluation.per_point_log_likelihood()
    log_w = evaluation.weights.log_w.double()
    w = (log_w - log_w.max(0).values).exp()
    se = w.std(0) / (math.sqrt(log_w.shape[0]) * w.mean(0))  # delta-method MC error of each estimate
    assert ((estimate - exact).abs() < 5 * se + 1e-3).all()
    assert evaluation.summary()["test_elbo"] < evaluation.summary()["test_log_lik"]
