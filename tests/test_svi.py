"""Tests of experiments.training.svi: minibatch scaling, parameter isolation, resume, and the non-finite-loss stop."""

from __future__ import annotations

import math

import pandas as pd
import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from torch import nn

from vae_priors.experiments.config import SVIConfig
from vae_priors.experiments.data.datasets import Dataset, Split
from vae_priors.experiments.files import FileFormatError, StateMismatchError
from vae_priors.experiments.registry import Pair, get_variant
from vae_priors.experiments.training.svi import NonFiniteLossError, check_checkpoint, fit, mean_elbo, trained_seconds
from vae_priors.models.linear_gaussian import ExactPosteriorGuide
from vae_priors.models.plate import subsample

FAST = SVIConfig(epochs=2, batch_size=100, lr=1e-2, patience=10)


def test_minibatch_loss_is_n_over_b_times_the_batch_sum_exactly(ppca, ppca_x):
    """Under the exact posterior guide each point contributes exactly -log p(x_n) (no MC noise), so the
    subsampled loss must be (N / B) sum_{n in batch} -log p(x_n); without the plate's scaling it is off by N/B."""
    loss_fn = Trace_ELBO()(ppca.model(), ExactPosteriorGuide(ppca))
    exact = ppca.log_marginal(ppca_x)
    n = len(ppca_x)
    for index in torch.randperm(n, generator=torch.Generator().manual_seed(0)).split(12):
        with subsample(index, n):
            loss = loss_fn(ppca_x[index]).item()
        expected = -(n / len(index)) * exact[index].sum().item()
        assert loss == pytest.approx(expected, rel=1e-5)
    assert loss_fn(ppca_x).item() == pytest.approx(-exact.sum().item(), rel=1e-5)


def test_mean_elbo_reports_the_full_data_elbo_per_point_for_any_batch_size(ppca, ppca_x):
    objective = Trace_ELBO()(ppca.model(), ExactPosteriorGuide(ppca))
    exact = ppca.log_marginal(ppca_x).mean().item()
    for batch_size in (7, 60, 1024):
        assert mean_elbo(objective, Split(ppca_x), batch_size) == pytest.approx(exact, rel=1e-5)


def test_expected_minibatch_elbo_of_a_vae_equals_its_full_data_elbo(digits300, small_model_config):
    """Fixed nets, MC noise: the mean of the subsampled estimates over the minibatches of a fixed permutation,
    repeated, matches the mean full-batch estimate within a few standard errors (a scaling error is ~N/B)."""
    pair = get_variant("vae").factory(digits300, small_model_config, "bernoulli")
    loss_fn = TraceMeanField_ELBO()(pair.model, pair.guide)
    x, n = digits300.train.x, len(digits300.train)
    batches = torch.randperm(n, generator=torch.Generator().manual_seed(0)).split(50)
    with torch.no_grad():
        full = torch.tensor([loss_fn(x).item() for _ in range(30)])
        minibatch = []
        for _ in range(5):
            for index in batches:
                with subsample(index, n):
                    minibatch.append(loss_fn(x[index]).item())
    minibatch = torch.tensor(minibatch).view(5, -1).mean(1)  # each entry estimates the full-data loss
    se = math.sqrt(full.var().item() / len(full) + minibatch.var().item() / len(minibatch))
    assert abs(full.mean().item() - minibatch.mean().item()) < 4 * se
    assert se < 0.01 * abs(full.mean().item()) * (1 - len(batches[0]) / n)  # far below a scaling error's size


def test_two_variants_in_one_process_keep_separate_parameters(digits300, small_model_config):
    pair_a = get_variant("vae").factory(digits300, small_model_config, "bernoulli")
    pair_b = get_variant("vae-constant-guide").factory(digits300, small_model_config, "bernoulli")
    fit(pair_a, digits300, FAST, seed=0)
    trained_a = {k: v.clone() for k, v in pair_a.model.state_dict().items()}
    fit(pair_b, digits300, FAST, seed=0)
    storage = lambda pair: {p.data_ptr() for p in [*pair.model.parameters(), *pair.guide.parameters()]}  # noqa: E731
    assert not storage(pair_a) & storage(pair_b)
    for name, value in pair_a.model.state_dict().items():
        assert torch.equal(value, trained_a[name]), f"training vae-constant-guide changed vae's {name}"
    assert len(pyro.get_param_store()) == 0


def _state(pair: Pair) -> dict[str, torch.Tensor]:
    return {**{f"model.{k}": v for k, v in pair.model.state_dict().items()},
            **{f"guide.{k}": v for k, v in pair.guide.state_dict().items()}}


def test_interrupted_and_resumed_fit_ends_with_the_parameters_of_an_uninterrupted_one(
        digits300, small_model_config, tmp_path):
    config = SVIConfig(epochs=4, batch_size=100, lr=1e-2, patience=10, warmup_epochs=3)
    build = lambda: (pyro.set_rng_seed(5), get_variant("vae").factory(digits300, small_model_config, "bernoulli"))[1]  # noqa: E731
    straight = build()
    straight_result = fit(straight, digits300, config, seed=1)
    first_half = build()
    fit(first_half, digits300, SVIConfig(**{**config.__dict__, "epochs": 2}), seed=1, checkpoint=tmp_path / "c.pt")
    resumed = build()
    resumed_result = fit(resumed, digits300, config, seed=1, checkpoint=tmp_path / "c.pt", resume=True)
    for name, value in _state(straight).items():
        assert torch.equal(value, _state(resumed)[name]), name
    assert straight_result.history.equals(resumed_result.history.assign(seconds=straight_result.history.seconds))
    assert resumed_result.best_epoch == straight_result.best_epoch


def test_resuming_a_fit_that_stopped_early_trains_no_further_epoch(digits300, small_model_config, tmp_path):
    config = SVIConfig(epochs=6, batch_size=100, lr=10.0, patience=1)  # a huge step: the val ELBO gets worse
    pair = get_variant("vae").factory(digits300, small_model_config, "bernoulli")
    stopped = fit(pair, digits300, config, seed=1, checkpoint=tmp_path / "c.pt")
    assert len(stopped.history) < config.epochs  # early stopping, not the epoch limit
    again = get_variant("vae").factory(digits300, small_model_config, "bernoulli")
    resumed = fit(again, digits300, config, seed=1, checkpoint=tmp_path / "c.pt", resume=True)
    assert resumed.history.equals(stopped.history) and resumed.best_epoch == stopped.best_epoch
    for name, value in _state(pair).items():
        assert torch.equal(value, _state(again)[name]), name


def test_a_time_budget_stops_at_an_epoch_end_and_equals_the_run_with_that_many_epochs(
        digits300, small_model_config, tmp_path):
    """max_minutes stops after the first epoch that ends past the budget (here: any epoch), keeps the best state,
    says so in stopped_by, and the state equals a run told to train that many epochs; a resume of the stopped
    checkpoint adds no epoch (the budget counts the recorded epochs, not this process's clock)."""
    build = lambda: (pyro.set_rng_seed(5), get_variant("vae").factory(digits300, small_model_config, "bernoulli"))[1]  # noqa: E731
    budget = SVIConfig(epochs=5, batch_size=100, lr=1e-2, patience=10, max_minutes=1e-9)
    timed = build()
    result = fit(timed, digits300, budget, seed=1, checkpoint=tmp_path / "c.pt")
    assert len(result.history) == 1 and result.stopped_by == "time"
    counted = build()
    by_epochs = fit(counted, digits300, SVIConfig(**{**budget.__dict__, "max_minutes": math.inf, "epochs": 1}), seed=1)
    assert by_epochs.stopped_by == "epochs"
    for name, value in _state(counted).items():
        assert torch.equal(value, _state(timed)[name]), name
    again = build()
    resumed = fit(again, digits300, SVIConfig(**{**budget.__dict__, "max_minutes": 1e-6}), seed=1,
                  checkpoint=tmp_path / "c.pt", resume=True)
    assert len(resumed.history) == 1 and resumed.stopped_by == "time"


def test_a_checkpoint_of_another_pair_is_refused_in_one_line(digits300, small_model_config, tmp_path):
    pair = get_variant("vae").factory(digits300, small_model_config, "bernoulli")
    fit(pair, digits300, FAST, checkpoint=tmp_path / "c.pt")
    other = get_variant("vae-constant-guide").factory(digits300, small_model_config, "bernoulli")
    with pytest.raises(StateMismatchError, match=r"c.pt does not match the model and guide.*(missing|unexpected)"):
        check_checkpoint(other, FAST, tmp_path / "c.pt")
    (tmp_path / "c.pt").write_bytes(b"")
    with pytest.raises(FileFormatError, match=r"cannot read checkpoint .*c.pt: the file is empty"):
        fit(pair, digits300, FAST, checkpoint=tmp_path / "c.pt", resume=True)


def test_resume_without_a_checkpoint_is_a_clear_error(digits300, small_model_config, tmp_path):
    pair = get_variant("vae").factory(digits300, small_model_config, "bernoulli")
    with pytest.raises(FileNotFoundError, match="cannot resume: no checkpoint"):
        fit(pair, digits300, FAST, checkpoint=tmp_path / "missing.pt", resume=True)


class NaNAfter(nn.Module):
    """A model that makes the observation NaN after ``calls`` training-mode calls (a diverging fit, on cue)."""

    def __init__(self, model: nn.Module, calls: int):
        super().__init__()
        self.model, self.calls, self.count = model, calls, 0

    def forward(self, x):
        if self.training:
            self.count += 1
            if self.count > self.calls:
                x = x * math.nan
        return self.model(x)


@pytest.mark.filterwarnings("ignore:Encountered NaN")
def test_non_finite_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(
        digits300, small_model_config, tmp_path):
    pair = get_variant("vae").factory(digits300, small_model_config, "bernoulli")
    # 300 points / batch 100 and one contract check before the first step: epoch 2 breaks on its first step
    pair.model = NaNAfter(pair.model, calls=4)
    checkpoint = tmp_path / "vae.pt"
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) in epoch 2.*last good state is in"):
        fit(pair, digits300, SVIConfig(epochs=3, batch_size=100, lr=1e-2), checkpoint=checkpoint, name="vae")
    saved = torch.load(checkpoint, weights_only=False)
    assert saved["state"]["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in saved["objective"].values() if v.is_floating_point())
    assert all(torch.isfinite(p).all() for p in pair.guide.parameters())  # no step was taken on the NaN loss
    fresh = get_variant("vae").factory(digits300, small_model_config, "bernoulli")
    fresh.model = NaNAfter(fresh.model, calls=10**9)
    resumed = fit(fresh, digits300, SVIConfig(epochs=2, batch_size=100, lr=1e-2), checkpoint=checkpoint, resume=True)
    assert list(resumed.history.epoch) == [1, 2]


def test_cuda_device_without_cuda_is_a_clear_error(digits300, small_model_config):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    pair = get_variant("vae").factory(digits300, small_model_config, "bernoulli")
    with pytest.raises(ValueError, match="torch sees no CUDA device"):
        fit(pair, digits300, SVIConfig(epochs=1, device="cuda"))


def test_reported_train_elbo_is_per_point_over_the_full_set(ppca, ppca_x):
    """lr = 0: the nets stay fixed, and with the exact posterior guide the ELBO is exactly mean log p(x)."""
    model, guide = ppca.model(), ExactPosteriorGuide(ppca)
    guide.a = nn.Parameter(guide._buffers.pop("a"))  # Adam needs a parameter; with lr = 0 it stays fixed
    data = Dataset("ppca", Split(ppca_x), Split(ppca_x[:20]), Split(ppca_x[:20]))
    result = fit(Pair(model, guide), data, SVIConfig(epochs=1, batch_size=16, lr=0.0))
    assert result.history.train_elbo[0] == pytest.approx(ppca.log_marginal(ppca_x).mean().item(), rel=1e-5)
    assert result.history.val_elbo[0] == pytest.approx(ppca.log_marginal(ppca_x[:20]).mean().item(), rel=1e-5)


def test_the_same_seed_gives_identical_training_and_another_seed_does_not(digits300, small_model_config):
    def train(seed: int):
        pyro.set_rng_seed(seed)
        pair = get_variant("vae").factory(digits300, small_model_config, "bernoulli")
        result = fit(pair, digits300, SVIConfig(epochs=2, batch_size=100), seed=seed, progress=False)
        return result.history.drop(columns="seconds"), [p.detach().clone() for p in pair.guide.parameters()]

    (h1, p1), (h2, p2), (h3, _) = train(0), train(0), train(1)
    pd.testing.assert_frame_equal(h1, h2)
    assert all(torch.equal(a, b) for a, b in zip(p1, p2, strict=True))
    assert not h1.train_elbo.equals(h3.train_elbo)


def test_trained_seconds_of_a_checkpoint_are_its_epochs_seconds(digits300, small_model_config, tmp_path):
    """A resumed run's ``fit_seconds`` adds these: the epochs trained in earlier sessions."""
    pair = get_variant("vae").factory(digits300, small_model_config, "bernoulli")
    result = fit(pair, digits300, SVIConfig(epochs=2, batch_size=100), seed=1, checkpoint=tmp_path / "c.pt")
    assert trained_seconds(tmp_path / "c.pt") == pytest.approx(result.history.seconds.sum(), rel=1e-12)
    assert trained_seconds(tmp_path / "c.pt") > 0
