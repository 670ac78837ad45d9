"""Mixture priors over the guide's posteriors: densities against float64 brute force, leave-one-out,
VampPrior = exemplar prior at K = N, gradients, the scalable path's error, and training on digits."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from vae_priors.experiments.config import ModelConfig, SVIConfig
from vae_priors.experiments.data.datasets import binarize, load_digits
from vae_priors.experiments.evaluation.importance import evaluate
from vae_priors.experiments.evaluation.log_weights import log_weights
from vae_priors.experiments.registry import get_variant
from vae_priors.experiments.training.svi import fit, mean_elbo
from vae_priors.guides.amortized_normal import AmortizedNormalGuide
from vae_priors.models import mixture_distributions
from vae_priors.models.exemplar_prior import ExemplarPrior
from vae_priors.models.mixture_distributions import GaussianMixture, HeadTailMixture
from vae_priors.models.mixture_priors import VampPrior
from vae_priors.models.neighbor_table import not_in


class LinearEncoder(nn.Module):
    """q(z|x) = N(x W^T, s^2 I) with W = I at start: the exact mixture is a known Gaussian mixture of the data."""

    def __init__(self, dim: int, scale: float):
        super().__init__()
        self.linear = nn.Linear(dim, dim, bias=False)
        nn.init.eye_(self.linear.weight)
        self.scale = scale

    def encode(self, x: torch.Tensor) -> dist.Distribution:
        loc = self.linear(x)
        return dist.Normal(loc, torch.full_like(loc, self.scale)).to_event(1)


def brute_force_mixture(z, log_w, loc, scale) -> torch.Tensor:
    """log sum_k w_k prod_d N(z_d; loc_kd, scale_kd) by explicit float64 loops over points and components."""
    z, log_w, loc, scale = (t.detach().double() for t in (z, log_w, loc, scale))
    out = torch.empty(z.shape[0], dtype=torch.float64)
    for b in range(z.shape[0]):
        terms = [log_w[b, k].item() + sum(-0.5 * ((z[b, d] - loc[k, d]) / scale[k, d]).item() ** 2
                                           - math.log(scale[k, d].item()) - 0.5 * math.log(2 * math.pi)
                                           for d in range(z.shape[1]))
                 for k in range(loc.shape[0])]
        top = max(terms)
        out[b] = top + math.log(sum(math.exp(t - top) for t in terms if t > -math.inf))
    return out


@pytest.mark.parametrize("block", [4096, 3])  # one block of components, or blocks of 3, 3 and 1 (logaddexp)
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-9), (torch.float32, 1e-3)])
def test_gaussian_mixture_log_prob_equals_float64_brute_force(dtype, tol, block, monkeypatch):
    monkeypatch.setattr(mixture_distributions, "COMPONENT_BLOCK", block)
    gen = torch.Generator().manual_seed(0)
    b, k, d, s = 4, 7, 3, 5
    logits = torch.randn(b, k, generator=gen, dtype=dtype)
    logits[0, 2] = logits[3, 6] = -math.inf
    loc = 3 * torch.randn(k, d, generator=gen, dtype=dtype)
    scale = 0.2 + torch.rand(k, d, generator=gen, dtype=dtype)
    z = 3 * torch.randn(s, b, d, generator=gen, dtype=dtype)
    mixture = GaussianMixture(logits, loc, scale, max_elements=3 * k)  # chunks of 3 queries
    log_w = logits.log_softmax(-1)
    got = mixture.log_prob(z)
    assert got.shape == (s, b) and isinstance(mixture, dist.MixtureSameFamily)
    for i in range(s):
        torch.testing.assert_close(got[i].double(), brute_force_mixture(z[i], log_w, loc, scale).double(),
                                   atol=tol, rtol=0)
    # under a particle plate Pyro expands the distribution to (S, B): same values
    torch.testing.assert_close(mixture.expand((s, b)).log_prob(z), got)


@pytest.mark.parametrize("shared_weights", [False, True])
def test_gaussian_mixture_with_one_shared_scale_equals_float64_brute_force(shared_weights, monkeypatch):
    monkeypatch.setattr(mixture_distributions, "COMPONENT_BLOCK", 4)  # blocks of 4, 4 and 1 components
    """The isotropic shortcut (an expanded scalar scale: the exemplar prior's shared variance), with per-point or
    shared mixture weights (folded into the bias), against the explicit sum in float64."""
    gen = torch.Generator().manual_seed(2)
    b, k, d = 4, 9, 3
    logits = torch.randn(1 if shared_weights else b, k, generator=gen, dtype=torch.float64).expand(b, k)
    loc = 2 * torch.randn(k, d, generator=gen, dtype=torch.float64)
    scale = torch.tensor(0.7, dtype=torch.float64).expand(k, d)
    z = 2 * torch.randn(b, d, generator=gen, dtype=torch.float64)
    got = GaussianMixture(logits, loc, scale, max_elements=2 * k).log_prob(z)
    expected = brute_force_mixture(z, logits.log_softmax(-1), loc, scale.contiguous())
    torch.testing.assert_close(got, expected, atol=1e-9, rtol=0)


@pytest.mark.parametrize("shared_head_scale", [False, True])  # (B, k, D) scales, or one (1, 1, D) for the head
def test_head_tail_mixture_log_prob_equals_float64_brute_force_over_per_point_components(shared_head_scale):
    gen = torch.Generator().manual_seed(1)
    b, k, m, d, s = 3, 2, 5, 3, 4
    head_logits, tail_logits = torch.randn(b, k, generator=gen), torch.randn(b, m, generator=gen)
    tail_logits[1, 3] = -math.inf
    head_loc, tail_loc = 2 * torch.randn(b, k, d, generator=gen), 2 * torch.randn(m, d, generator=gen)
    head_scale, tail_scale = 0.3 + torch.rand(b, k, d, generator=gen), 0.3 + torch.rand(m, d, generator=gen)
    if shared_head_scale:
        head_scale = head_scale[:1, :1]
    mixture = HeadTailMixture(head_logits, head_loc, head_scale, tail_logits, tail_loc, tail_scale, max_elements=2 * m)
    z = 2 * torch.randn(s, b, d, generator=gen)
    got = mixture.log_prob(z)
    assert got.shape == (s, b) and isinstance(mixture, dist.MixtureSameFamily)
    log_w = torch.cat([head_logits, tail_logits], -1).log_softmax(-1)
    for p in range(b):  # point p's components: its own head, then the shared tail
        loc, scale = torch.cat([head_loc[p], tail_loc]), torch.cat([head_scale.expand_as(head_loc)[p], tail_scale])
        want = brute_force_mixture(z[:, p], log_w[p].expand(s, -1), loc, scale)
        torch.testing.assert_close(got[:, p].double(), want, atol=1e-4, rtol=0)
    torch.testing.assert_close(mixture.expand((s, b)).log_prob(z), got)
    assert mixture.sample((7,)).shape == (7, b, d)


@pytest.mark.parametrize("samples", [1, 3])  # one z per point (a training step), or several
def test_head_tail_mixture_with_one_isotropic_head_scale_has_the_brute_force_density_and_gradients(samples):
    """The exemplar prior's shared scale (an expanded scalar): the head's squared distances by a custom autograd
    function. Its log-density and its gradients with respect to z, the head's locations and the scale equal
    those of the explicit Gaussian formula in float64."""
    gen = torch.Generator().manual_seed(4)
    b, k, m, d = 3, 4, 5, 3
    head_logits, tail_logits = torch.randn(b, k, generator=gen).double(), torch.randn(b, m, generator=gen).double()
    head_loc = (2 * torch.randn(b, k, d, generator=gen)).double().requires_grad_()
    tail_loc = 2 * torch.randn(m, d, generator=gen).double()
    raw = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    z = (2 * torch.randn(samples, b, d, generator=gen)).double().requires_grad_()

    def explicit() -> torch.Tensor:
        s = raw.exp()
        log_w = torch.cat([head_logits, tail_logits], -1).log_softmax(-1)
        locs = torch.cat([head_loc, tail_loc.expand(b, -1, -1)], 1)  # (b, k + m, d)
        dens = -0.5 * ((z[:, :, None] - locs) / s).pow(2).sum(-1) - d * s.log() - 0.5 * d * math.log(2 * math.pi)
        return (dens + log_w).logsumexp(-1)

    def fused() -> torch.Tensor:
        s = raw.exp()
        mixture = HeadTailMixture(head_logits, head_loc, s.expand(1, 1, d), tail_logits, tail_loc, s.expand(m, d))
        return mixture.log_prob(z)

    outputs = {}
    for name, function in (("explicit", explicit), ("fused", fused)):
        value = function()
        outputs[name] = (value, *torch.autograd.grad((value * torch.arange(1.0, b + 1)).sum(), (z, head_loc, raw)))
    for want, got in zip(outputs["explicit"], outputs["fused"], strict=True):
        torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)


def test_scalable_tail_mask_drops_exactly_the_point_and_its_head():
    tail = torch.tensor([0, 2, 2, 5, 7, 7, 9])
    excluded = torch.tensor([[2, 9], [7, 1], [3, 4]])
    brute = torch.tensor([[t not in row for t in tail.tolist()] for row in excluded.tolist()])
    assert torch.equal(not_in(tail, excluded, 10), brute)
    gen = torch.Generator().manual_seed(0)  # many duplicates and hits: 300 draws of 50 ids against rows of 20
    tail, excluded = torch.randint(0, 50, (300,), generator=gen).sort().values, torch.randint(0, 50, (8, 20),
                                                                                                 generator=gen)
    brute = torch.tensor([[t not in row for t in tail.tolist()] for row in excluded.tolist()])
    assert torch.equal(not_in(tail, excluded, 50), brute)


def test_gaussian_mixture_samples_follow_the_mixture_weights():
    loc = torch.tensor([[-10.0], [10.0]])
    mixture = GaussianMixture(torch.tensor([[0.0, math.log(3.0)]]), loc, torch.ones(2, 1))
    draws = mixture.sample((4000,))
    assert draws.shape == (4000, 1, 1)
    assert abs((draws > 0).double().mean().item() - 0.75) < 0.03  # P(second component) = 3/4


def test_exemplar_prior_leaves_own_component_out_in_training_and_keeps_it_at_evaluation():
    x = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0], [5.0, 5.0]])
    prior = ExemplarPrior(LinearEncoder(2, 0.5), x, path="exact")
    index = torch.tensor([1, 3])
    z = x[index]  # at its own exemplar, point n's own component dominates the full mixture
    scale = torch.full_like(x, 0.5)
    leave_one_out = torch.zeros(2, 4).index_put_((torch.arange(2), index), torch.tensor(-math.inf))
    float32 = dict(rtol=0, atol=2e-5)  # the expansion's float32 error: about eps * |z|^2 / s^2 = 1.2e-7 * 100 nats
    prior.train()
    torch.testing.assert_close(prior(index).log_prob(z).double(),
                               brute_force_mixture(z, leave_one_out.log_softmax(-1), x, scale).double(), **float32)
    prior.eval()
    full = brute_force_mixture(z, torch.full((2, 4), -math.log(4)), x, scale).double()
    torch.testing.assert_close(prior(index).log_prob(z).double(), full, **float32)
    # included: log 1/4 + log N(0; 0, 0.25 I_2) = -1.386 - 0.452, the others being 10 sigma away; excluded: < -40
    own = -math.log(4) - 2 * (math.log(0.5) + 0.5 * math.log(2 * math.pi))
    torch.testing.assert_close(full, torch.full((2,), own, dtype=torch.float64))
    assert prior.train()(index).log_prob(z).max() < -40


def test_vamp_prior_with_pseudo_inputs_frozen_at_training_points_equals_exemplar_prior():
    torch.manual_seed(0)
    x = 0.05 + 0.9 * torch.rand(30, 6)  # inside (0, 1), where the sigmoid parametrization is invertible
    guide = AmortizedNormalGuide(6, [16], 3)
    vamp = VampPrior(guide, x, bounded=True).eval()
    vamp.raw_pseudo_inputs.requires_grad_(False)
    exemplar = ExemplarPrior(guide, x, variance="encoder", path="exact").eval()
    z = torch.randn(2, 30, 3)
    index = torch.arange(30)
    torch.testing.assert_close(vamp(index).log_prob(z), exemplar(index).log_prob(z), atol=1e-5, rtol=0)


@pytest.mark.parametrize("make_prior", ["vamp", "exemplar-encoder", "exemplar-shared"])
def test_prior_log_density_sends_gradients_to_the_encoder(make_prior):
    torch.manual_seed(0)
    x = torch.rand(20, 5)
    guide = AmortizedNormalGuide(5, [8], 2)
    if make_prior == "vamp":
        prior = VampPrior(guide, x[:6], learn_weights=True)
    else:
        prior = ExemplarPrior(guide, x, variance=make_prior.split("-")[1], path="exact")
    z = torch.randn(4, 2)  # fixed draws: any gradient reaches the encoder through the prior's components
    prior(torch.arange(4)).log_prob(z).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in guide.parameters())
    own = [p for n, p in prior.named_parameters() if not n.startswith("guide.")]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in own)


def test_scalable_exemplar_log_density_is_close_to_the_exact_leave_one_out_density():
    torch.manual_seed(0)
    x = torch.rand(3000, 2)
    prior = ExemplarPrior(LinearEncoder(2, 0.03), x, path="scalable", neighbors=30, subset=256).train()
    for _ in range(3):  # neighbour-table sweeps (training does one per epoch)
        prior.refresh()
    exact_neighbors = torch.cdist(x, x).fill_diagonal_(math.inf).topk(30, largest=False).indices
    recall = (prior._table[:, :, None] == exact_neighbors[:, None, :]).any(-1).double().mean()
    index = torch.randperm(3000)[:256]
    z = prior.guide.encode(x[index]).sample()
    with torch.no_grad():
        error = prior(index).log_prob(z) - prior.mixture(index).log_prob(z)
    # the tail (a 256-point random subset standing for the other 2969) is what is left of the error
    assert recall > 0.95 and error.abs().mean() < 0.3 and error.mean().abs() < 0.1, (recall, error)


def test_exemplar_prior_rejects_bad_settings_with_a_fix():
    x = torch.rand(10, 3)
    guide = AmortizedNormalGuide(3, [4], 2)
    with pytest.raises(ValueError, match="encoder.*shared"):
        ExemplarPrior(guide, x, variance="learned")
    with pytest.raises(ValueError, match="subset <= N"):
        ExemplarPrior(guide, x, path="scalable", neighbors=5, subset=64)
    with pytest.raises(ValueError, match=r"\.eval\(\)"):
        ExemplarPrior(guide, x).train()(torch.tensor([3, 12]))


@pytest.fixture(scope="module")
def digits():
    return binarize(load_digits(), "static")


@pytest.mark.parametrize("variant", ["vae-vamp", "vae-exemplar"])
def test_mixture_prior_variants_train_on_digits_and_evaluate(digits, variant):
    pyro.set_rng_seed(0)
    pair = get_variant(variant).factory(digits, ModelConfig(hidden=[64], num_pseudo_inputs=100), "bernoulli")
    before = mean_elbo(pair.objective(pyro.infer.Trace_ELBO()), digits.val)
    result = fit(pair, digits, SVIConfig(epochs=3, batch_size=128), progress=False)
    assert result.best_elbo > before + 5, (before, result.history)
    weights = log_weights(pair.model, pair.guide, digits.test.tensors(slice(0, 50)), num_particles=20)
    assert weights.log_p_z.shape == (20, 50) and torch.isfinite(weights.log_w).all()
    summary = evaluate(pair, digits.test, num_particles=10).summary()
    assert math.isfinite(summary["test_log_lik"]) and summary["test_log_lik"] >= summary["test_elbo"]


def test_logsumexp_rows_matches_torch_on_wide_rows_with_excluded_and_empty_rows():
    """The clamped logsumexp against torch's: rows spanning 1000 nats, -inf entries (a left-out component), a row
    with nothing finite; and its gradient is the row's softmax."""
    gen = torch.Generator().manual_seed(3)
    matrix = (300 * torch.randn(5, 2000, generator=gen, dtype=torch.float64)).requires_grad_(True)
    with torch.no_grad():
        matrix[1, 7] = -math.inf
        matrix[4] = -math.inf
    got = mixture_distributions.logsumexp_rows(matrix)
    expected = matrix.logsumexp(-1)
    torch.testing.assert_close(got[:4], expected[:4], atol=1e-12, rtol=0)
    assert got[4] == -math.inf
    got[:4].sum().backward()
    torch.testing.assert_close(matrix.grad[:4], matrix[:4].detach().softmax(-1), atol=1e-12, rtol=0)
    scratch = matrix.detach().clone()  # overwrite=True, no gradient: the same values, the matrix used as scratch
    torch.testing.assert_close(mixture_distributions.logsumexp_rows(scratch, overwrite=True), got.detach(), atol=0,
                               rtol=0)
    assert not torch.equal(scratch, matrix.detach())
    kept = matrix.detach().clone().requires_grad_(True)  # with a gradient to take it leaves the input alone
    mixture_distributions.logsumexp_rows(kept, overwrite=True).sum()
    assert torch.equal(kept.detach(), matrix.detach())
