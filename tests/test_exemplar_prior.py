"""The exemplar prior's cached path: write-back of the guide's encodings, the end-of-epoch error against the
exact leave-one-out mixture (brute force), the cache renewal, and equal caches on every rank under DDP."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pyro
import pytest
import torch

from tests.test_distributed import _tiny_digits, process_group, spawn_gloo
from tests.test_mixture_priors import LinearEncoder, brute_force_mixture
from vae_priors.experiments.config import ModelConfig, SVIConfig
from vae_priors.experiments.files import load_state
from vae_priors.experiments.registry import get_variant
from vae_priors.experiments.training.svi import fit
from vae_priors.guides.amortized_normal import AmortizedNormalGuide
from vae_priors.models.exemplar_head_tail import compact
from vae_priors.models.exemplar_prior import ExemplarPrior
from vae_priors.models.plate import subsample


def _step(pair, x: torch.Tensor, index: torch.Tensor) -> None:
    """One SGD step of the pair's ELBO on the training points ``index``."""
    objective = pair.objective(pyro.infer.Trace_ELBO())
    optimizer = torch.optim.SGD(objective.parameters(), lr=0.1)
    with subsample(index, x.shape[0]):
        loss = objective(x[index]) / x.shape[0]
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def _scalable_pair(data, **settings):
    cfg = ModelConfig(hidden=[8], latent_dim=3, exemplar_path="scalable", exemplar_neighbors=2,
                      exemplar_subset=6, **settings)
    return get_variant("vae-exemplar").factory(data, cfg, "bernoulli")


def test_a_training_step_writes_the_guides_encodings_of_its_batch_into_the_cache():
    pyro.set_rng_seed(0)
    data = _tiny_digits(train=40)
    pair = _scalable_pair(data)
    prior, x = pair.model.prior, data.train.x
    _step(pair, x, torch.arange(5))  # builds the cache
    before_loc = prior._loc.clone()
    index = torch.tensor([7, 20, 33])
    with torch.no_grad():
        expected = pair.guide.encode(x[index]).base_dist  # the encoder as the step's guide sees it
    _step(pair, x, index)
    torch.testing.assert_close(prior._loc[index], expected.loc)
    torch.testing.assert_close(prior._scale[index], expected.scale)
    others = torch.ones(40, dtype=torch.bool).index_fill_(0, index, False)
    assert torch.equal(prior._loc[others], before_loc[others])
    assert not torch.equal(prior._loc[index], before_loc[index]), "the step moved nothing: the check proves nothing"


def test_with_affine_drift_a_step_stores_its_batch_in_the_anchor_frame_and_the_map_brings_it_back():
    pyro.set_rng_seed(0)
    data = _tiny_digits(train=40)
    pair = _scalable_pair(data, exemplar_drift="affine")
    prior, x = pair.model.prior, data.train.x
    _step(pair, x, torch.arange(5))  # builds the cache: its means are the anchor
    anchor = prior._anchor.clone()
    index = torch.arange(10, 30)
    with torch.no_grad():
        expected = pair.guide.encode(x[index]).base_dist
    _step(pair, x, index)
    assert prior._map is not None and torch.equal(prior._anchor, anchor)  # the anchor frame stays put
    torch.testing.assert_close(prior._current(prior._loc[index]), expected.loc, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(prior._scale[index], expected.scale)


def test_encodings_of_other_inputs_than_the_stored_exemplars_are_not_written_back():
    pyro.set_rng_seed(0)
    data = _tiny_digits(train=40)
    pair = _scalable_pair(data)
    prior, x = pair.model.prior, data.train.x
    _step(pair, x, torch.arange(5))
    before = prior._loc.clone()
    index = torch.tensor([7, 20])
    objective = pair.objective(pyro.infer.Trace_ELBO())
    with subsample(index, 40):
        objective(1.0 - x[index])  # e.g. a dynamically binarized draw, not the stored image
    assert torch.equal(prior._loc, before)


def test_end_epoch_error_is_the_stale_cache_against_the_exact_leave_one_out_mixture_by_brute_force():
    """With the tail covering all N, the estimate is the mixture of the cached components; after the encoder
    moves, ``end_epoch`` must report its mean |log difference| from the current exact mixture, then hold the
    current encodings."""
    torch.manual_seed(0)
    n = 12
    x = torch.randn(n, 2)
    prior = ExemplarPrior(LinearEncoder(2, 0.7), x, path="scalable", neighbors=2, subset=n,
                          track_points=n).train()
    prior.refresh()
    with torch.no_grad():
        prior.guide.linear.weight.mul_(1.3)  # the encoder moves; the cache keeps the old means
    stale_loc, scale = x.clone(), torch.full((n, 2), 0.7)
    fresh_loc = 1.3 * x
    rng = torch.Generator().manual_seed(10_000 + prior._sweeps)  # the draws end_epoch makes
    index = torch.randperm(n, generator=rng)
    z = fresh_loc[index] + 0.7 * torch.randn(n, 2, generator=rng)
    loo = torch.zeros(n, n).index_put_((torch.arange(n), index), torch.tensor(-math.inf)).log_softmax(-1)
    error = brute_force_mixture(z, loo, stale_loc, scale) - brute_force_mixture(z, loo, fresh_loc, scale)
    summary = prior.end_epoch()
    assert error.abs().mean() > 0.1  # a real difference to detect
    assert summary["prior_error"] == pytest.approx(error.abs().mean().item(), abs=1e-4)
    assert summary["prior_error_mean"] == pytest.approx(error.mean().item(), abs=1e-4)
    torch.testing.assert_close(prior._loc, fresh_loc)
    assert prior.end_epoch()["prior_error"] < 1e-4  # fresh cache, exact tail: nothing left to report


def test_an_exactly_affine_drift_is_followed_exactly():
    """A linear encoder whose weight changes moves every mean by one linear map: fitted on a batch's fresh means,
    the affine drift correction carries the whole cache to the current means, so the estimate (tail over all N)
    is the exact leave-one-out mixture again, where the uncorrected cache is off by more than 0.1 nats."""
    torch.manual_seed(0)
    n, change = 12, torch.tensor([[1.3, 0.4], [-0.2, 0.9]])
    x = torch.randn(n, 2)
    errors = {}
    for drift in ("none", "affine"):
        prior = ExemplarPrior(LinearEncoder(2, 0.7), x, path="scalable", neighbors=2, subset=n, track_points=n,
                              drift=drift).train()
        prior.refresh()
        with torch.no_grad():
            prior.guide.linear.weight.copy_(change)
            batch = torch.tensor([1, 4, 6, 9])  # more pairs than the 2 + 1 unknowns per latent dimension
            fresh = prior.guide.encode(x[batch]).base_dist
        if drift == "affine":
            prior._follow(batch, fresh.loc, fresh.scale)
            torch.testing.assert_close(prior._current(prior._loc), x @ change.T, atol=1e-5, rtol=1e-5)
        errors[drift] = prior.end_epoch()["prior_error"]
    assert errors["none"] > 0.1 and errors["affine"] < 1e-4, errors


def test_end_epoch_reports_the_error_of_a_head_that_misses_the_near_exemplars():
    """Two far clusters; every table row points into the other cluster and the tail is small, so the estimate
    misses nearly all of the mixture's mass: the reported error must be large and negative."""
    torch.manual_seed(0)
    x = torch.cat([torch.randn(50, 2) * 0.1, 20 + torch.randn(50, 2) * 0.1])
    prior = ExemplarPrior(LinearEncoder(2, 0.1), x, path="scalable", neighbors=2, subset=4,
                          track_points=100).train()
    prior.refresh()
    prior._table = (torch.arange(100)[:, None] + torch.tensor([50, 51])) % 100  # the wrong cluster
    summary = prior.end_epoch()
    assert summary["prior_error"] > 1.0 and summary["prior_error_mean"] < -1.0, summary


def test_fit_records_the_scalable_priors_error_in_the_history():
    pyro.set_rng_seed(0)
    data = _tiny_digits(train=40)
    result = fit(_scalable_pair(data), data, SVIConfig(epochs=2, batch_size=10), progress=False)
    assert {"prior_error", "prior_error_mean"} <= set(result.history.columns)
    assert result.history["prior_error"].between(0, 50).all()
    exact = fit(get_variant("vae-exemplar").factory(data, ModelConfig(hidden=[8], latent_dim=3), "bernoulli"),
                data, SVIConfig(epochs=1, batch_size=10), progress=False)
    assert "prior_error" not in exact.history.columns  # nothing is estimated on the exact path


def _fit_and_keep_state(rank: int, world: int, port: int, out: str, drift: str, clusters: int) -> None:
    with process_group(rank, world, port):
        pyro.set_rng_seed(0)
        data = _tiny_digits(train=40)
        data = replace(data, val=replace(data.val, x=data.val.x[:2], labels=data.val.labels[:2]))
        pair = _scalable_pair(data, exemplar_drift=drift, exemplar_clusters=clusters, exemplar_cluster_draws=3,
                              exemplar_probe=1 if clusters else 0,  # with clusters: draws, a probe and a
                              exemplar_nearest=5 if clusters else 0)  # head of the 5 candidates nearest to z
        prior = pair.model.prior
        states, end_epoch = [], prior.end_epoch

        def state() -> list[torch.Tensor]:  # with clusters, their centres too (fitted on every rank alike)
            return [t.clone() for t in (prior._loc, prior._scale, prior._table)] + (
                [prior._clusters.centres.clone(), prior._clusters.assign.clone()] if clusters else [])

        def keep_then_end_epoch():  # the state the steps left, before the epoch's renewal makes the caches equal
            states.append(state())
            return end_epoch()

        prior.end_epoch = keep_then_end_epoch
        fit(pair, data, SVIConfig(epochs=2, batch_size=7), seed=1, progress=False)  # uneven shards: 4 + 3
        states.append(state())
        torch.save(states, Path(out) / f"rank{rank}.pt")


@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                    reason="this torch build has no torch.distributed with the gloo backend")
@pytest.mark.parametrize("drift,clusters", [("none", 0), ("affine", 0), ("none", 4)])
def test_two_ranks_keep_the_same_cache_and_neighbour_table(tmp_path, drift, clusters):
    spawn_gloo(_fit_and_keep_state, str(tmp_path), drift, clusters)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for state0, state1 in zip(*ranks, strict=True):
        for a, b in zip(state0, state1, strict=True):
            assert torch.equal(a, b)
    assert not torch.equal(ranks[0][0][0], ranks[0][1][0]), "the cache never changed: the check proves nothing"


def test_a_guide_without_an_encoder_net_still_trains_on_the_cache():
    torch.manual_seed(0)
    x = torch.rand(30, 4)
    prior = ExemplarPrior(LinearEncoder(4, 0.5), x, path="scalable", neighbors=2, subset=8).train()
    assert not hasattr(prior.guide, "net")
    mixture = prior(torch.arange(5))  # no write-back hook: the cache comes from refresh alone
    assert torch.isfinite(mixture.log_prob(torch.randn(5, 4))).all()


def _loo_logits(index: torch.Tensor, n: int) -> torch.Tensor:
    """Log-weights of the leave-one-out mixture for training points ``index``: 1/(N-1) on the others."""
    return torch.zeros(len(index), n).index_put_((torch.arange(len(index)), index),
                                                 torch.tensor(-math.inf)).log_softmax(-1)


def _epoch_prior(n: int = 12) -> tuple[ExemplarPrior, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(n, 2)
    prior = ExemplarPrior(LinearEncoder(2, 0.7), x, path="scalable", neighbors=2, subset=n, track_points=n,
                          components="epoch").train()
    return prior, x


def test_with_epoch_components_the_estimate_is_the_exact_mixture_of_the_epochs_prior_after_the_encoder_moves():
    """The tail covers all N, so the estimate is the mixture of the cache; with epoch components the cache is the
    prior, so the estimate stays exact when the encoder moves within the epoch (where current components lag)."""
    prior, x = _epoch_prior()
    index = torch.tensor([0, 5, 11])
    prior(index)  # the first step of the epoch: the components are the encoder's now (W = I)
    with torch.no_grad():
        prior.guide.linear.weight.mul_(1.3)
    z = torch.randn(3, 2)
    scale, loo = torch.full((12, 2), 0.7), _loo_logits(index, 12)
    estimate = prior(index).log_prob(z)
    torch.testing.assert_close(estimate.double(), brute_force_mixture(z, loo, x, scale), atol=1e-5, rtol=1e-5)
    moved = brute_force_mixture(z, loo, 1.3 * x, scale)
    assert (estimate.double() - moved).abs().mean() > 0.1, "the encoder's move changed nothing: the check is void"


def test_epoch_components_are_renewed_at_the_next_step_not_at_end_epoch_which_reports_their_lag():
    """``end_epoch`` leaves the validated components in place (the checkpoint holds them) and reports how far
    their mixture is from the current encoder's by brute force; the next training step renews them."""
    prior, x = _epoch_prior()
    prior(torch.arange(3))
    with torch.no_grad():
        prior.guide.linear.weight.mul_(1.3)
    rng = torch.Generator().manual_seed(10_000 + prior._sweeps)  # the draws end_epoch makes
    index = torch.randperm(12, generator=rng)
    z = 1.3 * x[index] + 0.7 * torch.randn(12, 2, generator=rng)
    scale, loo = torch.full((12, 2), 0.7), _loo_logits(index, 12)
    lag = brute_force_mixture(z, loo, x, scale) - brute_force_mixture(z, loo, 1.3 * x, scale)
    summary = prior.end_epoch()
    assert lag.abs().mean() > 0.1
    assert summary["prior_lag"] == pytest.approx(lag.abs().mean().item(), abs=1e-4)
    assert summary["prior_lag_mean"] == pytest.approx(lag.mean().item(), abs=1e-4)
    assert summary["prior_error"] < 1e-4  # exact tail over the prior's own components
    torch.testing.assert_close(prior.component_loc, x)
    prior(torch.arange(3))
    torch.testing.assert_close(prior.component_loc, 1.3 * x)


def test_evaluation_uses_the_epochs_components_and_a_state_dict_carries_them():
    prior, x = _epoch_prior()
    prior(torch.arange(3))
    with torch.no_grad():
        prior.guide.linear.weight.mul_(1.3)
    z = torch.randn(4, 2)
    value = prior.eval()(torch.arange(4)).log_prob(z)
    all_n = torch.zeros(4, 12).log_softmax(-1)
    torch.testing.assert_close(value.double(), brute_force_mixture(z, all_n, x, torch.full((12, 2), 0.7)),
                               atol=1e-5, rtol=1e-5)
    other = ExemplarPrior(LinearEncoder(2, 0.7), torch.zeros(12, 2), path="scalable", neighbors=2, subset=12,
                          components="epoch").eval()
    other.load_state_dict(prior.state_dict())
    torch.testing.assert_close(other(torch.arange(4)).log_prob(z), value)


@pytest.mark.parametrize("settings", [{"drift": "affine"}, {"refresh_points": 100}, {"components": "lagged"}])
def test_epoch_components_refuse_settings_that_move_them_within_an_epoch(settings):
    settings = {"components": "epoch", **settings}
    with pytest.raises(ValueError, match="components"):
        ExemplarPrior(LinearEncoder(2, 0.7), torch.randn(12, 2), path="scalable", neighbors=2, subset=12, **settings)


def test_fit_with_epoch_components_records_error_and_lag():
    pyro.set_rng_seed(0)
    data = _tiny_digits(train=40)
    result = fit(_scalable_pair(data, exemplar_components="epoch"), data, SVIConfig(epochs=2, batch_size=10),
                 progress=False)
    assert {"prior_error", "prior_lag", "prior_lag_mean"} <= set(result.history.columns)
    assert result.history["prior_lag"].between(0, 50).all()


def test_a_two_hop_head_is_each_distinct_member_of_the_rows_and_their_rows_and_the_tail_stays_exact():
    """hops=2: head_n = row_n and the rows of its members, each exemplar once and never n; with the tail over all
    N the estimate is still the exact leave-one-out mixture of the cache, whatever the table holds."""
    torch.manual_seed(0)
    n = 12
    x = torch.randn(n, 2)
    prior = ExemplarPrior(LinearEncoder(2, 0.7), x, path="scalable", neighbors=2, subset=n, components="epoch",
                          hops=2).train()
    index = torch.tensor([0, 5, 11])
    prior(index)
    table = prior._table
    estimate = prior._estimate(index, refine=False)
    for row, point in enumerate(index.tolist()):
        members = {m for first in table[point].tolist() for m in [first, *table[first].tolist()]} - {point}
        kept = estimate.head_loc[row][estimate.mixture_distribution.logits[row, : estimate.head_loc.shape[1]] > -1e30]
        assert len(kept) == len(members)  # each member once
        torch.testing.assert_close(kept, x[sorted(members)])
    z = torch.randn(3, 2)
    loo = _loo_logits(index, n)
    torch.testing.assert_close(estimate.log_prob(z).double(), brute_force_mixture(z, loo, x, torch.full((n, 2), 0.7)),
                               atol=1e-5, rtol=1e-5)


def test_compact_puts_each_rows_members_first_in_order_and_cuts_the_rows_at_the_fullest():
    """The head a step scores: members in their order, padding with the caller's fill id marked as dropped, and
    at least one column when nothing is left."""
    head = torch.tensor([[3, 5, 5, 7], [1, 2, 4, 9]])
    dropped = torch.tensor([[False, False, True, False], [True, True, False, True]])
    ids, gone = compact(head, dropped, torch.tensor([0, 8]))
    assert ids.tolist() == [[3, 5, 7], [4, 8, 8]]
    assert gone.tolist() == [[False, False, False], [False, True, True]]
    ids, gone = compact(head, torch.ones_like(dropped), torch.tensor([0, 8]))
    assert ids.tolist() == [[0], [8]] and gone.all()


def test_a_two_hop_estimate_is_unbiased_in_density_over_the_tail_draws():
    """With a tail of 8 draws among 40 exemplars, the mean of the estimated density over many draws is the exact
    leave-one-out density: the per-row head sizes enter the tail's weight correctly."""
    torch.manual_seed(0)
    n = 40
    x = torch.randn(n, 2)
    prior = ExemplarPrior(LinearEncoder(2, 0.7), x, path="scalable", neighbors=2, subset=8, components="epoch",
                          hops=2).train()
    index = torch.tensor([3, 17, 30])
    prior(index)
    z = torch.randn(3, 2)
    generator = torch.Generator().manual_seed(1)
    densities = torch.stack([prior._estimate(index, refine=False, generator=generator).log_prob(z).double().exp()
                             for _ in range(4000)])
    exact = brute_force_mixture(z, _loo_logits(index, n), x, torch.full((n, 2), 0.7)).exp()
    standard_error = densities.std(0) / math.sqrt(len(densities))
    assert ((densities.mean(0) - exact).abs() < 4 * standard_error).all(), (densities.mean(0), exact, standard_error)
    assert (standard_error > 0).all()  # the draws did vary: the check is not void


def test_a_renewal_sweeps_a_young_table_until_it_settles_and_a_settled_one_once():
    """sweeps=8: the first renewal (random rows) sweeps until a sweep renews under a tenth of the entries, which
    leaves the table near the exact k nearest (brute force); the next renewal on the same components sweeps once.
    ``end_epoch`` reports both numbers; sweeps=1 always sweeps once."""
    torch.manual_seed(0)
    x = torch.randn(400, 2)
    prior = ExemplarPrior(LinearEncoder(2, 0.7), x, path="scalable", neighbors=4, subset=32, components="epoch",
                          sweeps=8).train()
    prior(torch.arange(3))
    young = prior.end_epoch()
    distances = torch.cdist(x, x).fill_diagonal_(math.inf)
    exact = distances.topk(4, largest=False).indices
    recall = (prior._table[:, :, None] == exact[:, None, :]).any(-1).double().mean().item()
    assert 1 < young["table_sweeps"] <= 8 and recall > 0.9
    assert young["table_new"] < 0.1 or young["table_sweeps"] == 8
    prior(torch.arange(3))  # renewed from the same encoder: the same components
    settled = prior.end_epoch()
    assert settled["table_sweeps"] == 1 and settled["table_new"] < 0.1
    once = ExemplarPrior(LinearEncoder(2, 0.7), x, path="scalable", neighbors=4, subset=32, components="epoch").train()
    once(torch.arange(3))
    assert once.end_epoch()["table_sweeps"] == 1


def test_sweeps_below_one_are_refused():
    with pytest.raises(ValueError, match="sweeps must be >= 1"):
        ExemplarPrior(LinearEncoder(2, 0.7), torch.randn(12, 2), path="scalable", neighbors=2, subset=12, sweeps=0)


@pytest.mark.parametrize("components, drift, gradient", [("epoch", "none", "none"), ("current", "none", "none"),
                                                          ("current", "affine", "none"), ("epoch", "none", "deferred")])
def test_an_interrupted_and_resumed_fit_of_the_scalable_prior_ends_as_an_uninterrupted_one(components, drift,
                                                                                           gradient, tmp_path):
    """The checkpoint carries the neighbour table, the sweep count, the deferred gradients and (current components)
    the cache and the affine drift's state, so the resumed run draws and estimates exactly as the uninterrupted one."""
    data = _tiny_digits(train=60)
    config = SVIConfig(epochs=4, batch_size=20, patience=10, warmup_epochs=2)
    settings = {"exemplar_components": components, "exemplar_hops": 2, "exemplar_sweeps": 3, "exemplar_drift": drift,
                "exemplar_gradient": gradient}

    def build():
        pyro.set_rng_seed(5)
        return _scalable_pair(data, **settings)

    straight = fit(build(), data, config, seed=1, progress=False)
    fit(build(), data, replace(config, epochs=2), seed=1, checkpoint=tmp_path / "c.pt", progress=False)
    resumed = fit(build(), data, config, seed=1, checkpoint=tmp_path / "c.pt", resume=True, progress=False)
    assert resumed.history.drop(columns="seconds").equals(straight.history.drop(columns="seconds"))
    assert straight.history["val_elbo"].notna().all()


def test_a_state_dict_without_the_table_loads_and_the_next_step_builds_it():
    """Checkpoints written before the table was saved still load (strictly); the next step rebuilds the table."""
    pyro.set_rng_seed(0)
    data = _tiny_digits(train=40)
    pair = _scalable_pair(data, exemplar_components="epoch")
    _step(pair, data.train.x, torch.arange(5))
    old = {k: v for k, v in pair.model.state_dict().items() if not k.endswith("_extra_state")}
    other = _scalable_pair(data, exemplar_components="epoch")
    load_state(other.model, old, "old.pt", "model")  # the run's loader, which checks the keys first
    assert other.model.prior._table is None
    _step(other, data.train.x, torch.arange(5))
    assert other.model.prior._table is not None


def _searching_prior(n: int, subset: int) -> tuple[ExemplarPrior, torch.Tensor]:
    torch.manual_seed(0)
    x = 3 * torch.randn(n, 2)
    prior = ExemplarPrior(LinearEncoder(2, 0.3), x, path="scalable", neighbors=3, subset=subset, components="epoch",
                          hops=2, sweeps=8, landmarks=16).train()
    return prior, x


def test_with_the_tail_over_all_n_a_searched_head_still_gives_the_exact_leave_one_out_mixture():
    """The search may find n itself or members the rows already hold: each counts once and n never, so with every
    exemplar in the tail the estimate is the exact leave-one-out mixture of the components."""
    prior, x = _searching_prior(60, 60)
    index = torch.tensor([0, 7, 33, 59])
    estimate = prior(index)
    z = torch.cat([x[index[:2]] + 0.1, 3 * torch.randn(2, 2)])  # two at their own exemplar: the search finds n
    exact = brute_force_mixture(z, _loo_logits(index, 60), x, torch.full((60, 2), 0.3))
    torch.testing.assert_close(estimate.log_prob(z).double(), exact, atol=1e-5, rtol=1e-5)


def test_the_search_finds_the_exemplar_nearest_to_z_outside_the_points_neighbourhood():
    """z drawn far from training point n: the searched head holds z's nearest exemplar (brute force) for most z,
    where the table's rows 2 hops from n hold it for almost none."""
    torch.manual_seed(0)
    x = 3 * torch.randn(600, 2)
    prior = ExemplarPrior(LinearEncoder(2, 0.3), x, path="scalable", neighbors=5, subset=32, components="epoch",
                          hops=2, sweeps=8, landmarks=64).train()
    index = torch.arange(200)
    prior(index)
    z = 3 * torch.randn(200, 2)
    distances = torch.cdist(z, x)
    distances[torch.arange(200), index] = math.inf
    nearest = distances.argmin(1)
    two_hops = torch.cat([prior._table[index], prior._table[prior._table[index]].flatten(1)], 1)
    searched = prior._search(two_hops, torch.randint(0, 600, (64,)), z)
    found = lambda head: (head == nearest[:, None]).any(1).double().mean().item()  # noqa: E731
    assert found(searched) > 0.7 and found(two_hops) < 0.1


def test_a_searched_estimate_is_unbiased_in_density_over_the_tail_draws():
    """Given z the searched head is fixed and the tail draws it excludes are uniform over the rest: the mean
    estimated density over many draws is the exact leave-one-out density (8 draws among 40 exemplars)."""
    prior, x = _searching_prior(40, 8)
    index = torch.tensor([3, 17, 30])
    prior(index)
    z = 3 * torch.randn(3, 2)
    generator = torch.Generator().manual_seed(1)
    densities = torch.stack([prior._estimate(index, refine=False, generator=generator).log_prob(z).double().exp()
                             for _ in range(4000)])
    exact = brute_force_mixture(z, _loo_logits(index, 40), x, torch.full((40, 2), 0.3)).exp()
    standard_error = densities.std(0) / math.sqrt(len(densities))
    bound = 4 * standard_error + 1e-5 * exact  # (float32 rounding where the head holds almost all of the mass)
    assert ((densities.mean(0) - exact).abs() < bound).all(), (densities.mean(0), exact, standard_error)
    assert (standard_error > 0).all()


def test_landmarks_are_refused_below_zero_and_with_affine_drift():
    for settings in ({"landmarks": -1}, {"landmarks": 8, "drift": "affine"}):
        with pytest.raises(ValueError, match="landmarks"):
            ExemplarPrior(LinearEncoder(2, 0.7), torch.randn(12, 2), path="scalable", neighbors=2, subset=12,
                          **settings)


def test_fit_with_a_search_around_z_trains_and_records_the_estimates_error():
    """Through ``fit``: the contract check samples the prior (``SearchedHeadTail.sample``), the steps score the
    guide's z (``log_prob`` with the search), and ``end_epoch`` measures the searched estimate."""
    pyro.set_rng_seed(0)
    data = _tiny_digits(train=40)
    pair = _scalable_pair(data, exemplar_components="epoch", exemplar_hops=2, exemplar_landmarks=8)
    result = fit(pair, data, SVIConfig(epochs=2, batch_size=10), progress=False)
    assert result.history["prior_error"].between(0, 50).all() and result.history["val_elbo"].notna().all()


def _subset_logits(index: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Log-weights of the mixture over the kept exemplars other than n: 1/|S less n| on each."""
    logits = torch.where(kept, 0.0, -math.inf).expand(len(index), -1).clone()
    logits[torch.arange(len(index)), index] = -math.inf
    return logits.log_softmax(-1)


@pytest.mark.parametrize("path,hops,landmarks", [("exact", 1, 0), ("scalable", 1, 0), ("scalable", 2, 0),
                                                 ("scalable", 2, 4)])
def test_with_keep_a_training_step_is_the_exact_mixture_over_its_random_subset_of_exemplars(path, hops, landmarks):
    """keep = 0.5 (exemplar subsampling): the step's prior for point n is 1/|S less n| sum_{m in S, m != n} r_m over
    a random half S of the exemplars, drawn anew each step (brute force; the tail over all of S makes the scalable
    path exact), whether or not n is in S; in eval mode the prior is over all N again."""
    n = 12
    x = torch.randn(n, 2, generator=torch.Generator().manual_seed(0))
    prior = ExemplarPrior(LinearEncoder(2, 0.7), x, path=path, neighbors=2, subset=n, components="epoch",
                          hops=hops, landmarks=landmarks, keep=0.5).train()
    index, z, scale = torch.tensor([0, 5, 11]), torch.randn(3, 2), torch.full((n, 2), 0.7)
    subsets = []
    for seed in range(6):
        torch.manual_seed(seed)
        kept = prior._draw_kept()[1]
        torch.manual_seed(seed)
        estimate = prior(index).log_prob(z)
        assert kept.sum() == 6
        torch.testing.assert_close(estimate.double(), brute_force_mixture(z, _subset_logits(index, kept), x, scale),
                                   atol=1e-5, rtol=1e-5)
        subsets.append(kept)
    assert len({tuple(k.tolist()) for k in subsets}) > 1  # a new subset each step
    assert any(bool(k[index].any()) and not bool(k[index].all()) for k in subsets)  # n in S and not, in one step
    everything = brute_force_mixture(z, torch.full((3, n), -math.log(n)), x, scale)
    torch.testing.assert_close(prior.eval()(index).log_prob(z).double(), everything, atol=1e-5, rtol=1e-5)


def test_with_keep_the_estimate_is_unbiased_in_density_over_the_tail_draws_from_the_subset():
    """Given the step's subset S (half of 40 exemplars), a tail of 6 draws from S weighted by the kept head's size
    averages to the exact density of the mixture over S less n."""
    torch.manual_seed(0)
    n = 40
    x = torch.randn(n, 2)
    prior = ExemplarPrior(LinearEncoder(2, 0.7), x, path="scalable", neighbors=3, subset=6, components="epoch",
                          hops=2, keep=0.5).train()
    index, z = torch.tensor([3, 17, 30]), torch.randn(3, 2)
    prior(index)
    kept = prior._draw_kept()
    generator = torch.Generator().manual_seed(1)
    densities = torch.stack([prior._estimate(index, False, generator, kept).log_prob(z).double().exp()
                             for _ in range(4000)])
    exact = brute_force_mixture(z, _subset_logits(index, kept[1]), x, torch.full((n, 2), 0.7)).exp()
    standard_error = densities.std(0) / math.sqrt(len(densities))
    assert ((densities.mean(0) - exact).abs() < 4 * standard_error).all(), (densities.mean(0), exact, standard_error)
    assert (standard_error > 0).all()


@pytest.mark.parametrize("keep", [0.0, -0.5, 1.5])
def test_a_keep_outside_zero_to_one_is_refused(keep):
    with pytest.raises(ValueError, match="keep must be in"):
        ExemplarPrior(LinearEncoder(2, 0.7), torch.randn(12, 2), keep=keep)


def test_fit_with_keep_trains_and_measures_the_estimate_against_the_mixture_over_all_n():
    """Through the registry and ``fit``: ``model.exemplar_keep`` reaches the prior; ``end_epoch`` still measures
    the estimate of the full leave-one-out mixture (its error stays that of the tail draws)."""
    pyro.set_rng_seed(0)
    data = _tiny_digits(train=40)
    pair = _scalable_pair(data, exemplar_components="epoch", exemplar_hops=2, exemplar_keep=0.5)
    assert pair.model.prior.kept_size == 20
    result = fit(pair, data, SVIConfig(epochs=2, batch_size=10), progress=False)
    assert result.history["prior_error"].between(0, 50).all() and result.history["val_elbo"].notna().all()


def _deferred_prior(n: int = 12, d: int = 2) -> tuple[ExemplarPrior, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.rand(n, 5)
    guide = AmortizedNormalGuide(5, [6], d)
    prior = ExemplarPrior(guide, x, path="scalable", neighbors=2, subset=n, components="epoch", hops=2,
                          gradient="deferred").train()
    return prior, x


def test_deferred_gradient_collects_the_gradient_of_the_exact_loo_mixture_wrt_each_components_location():
    """gradient="deferred": after a backward pass through a step's estimate (exact here: the tail covers all N),
    each exemplar's deferred gradient is d/d mu_m of sum_n log p(z_n | not n), by brute force over a leaf copy of
    the component locations."""
    prior, _ = _deferred_prior()
    index, z = torch.tensor([0, 5, 7]), torch.randn(3, 2)
    prior(index).log_prob(z).sum().backward()
    loc = prior.component_loc.clone().requires_grad_()
    scale = prior.component_scale
    log_r = torch.distributions.Normal(loc, scale).log_prob(z[:, None]).sum(-1)  # (B, N)
    log_r = log_r.index_put((torch.arange(3), index), torch.tensor(-math.inf))
    (expected,) = torch.autograd.grad(log_r.logsumexp(1).sum(), loc)
    torch.testing.assert_close(prior._deferred, expected, atol=1e-5, rtol=1e-4)
    assert prior._deferred.abs().sum() > 0  # the check is not void


def test_deferred_gradient_reaches_the_encoder_at_the_exemplars_next_visit_and_is_then_cleared():
    """At a step whose batch holds exemplar m, its deferred gradient g_m joins the gradient of the guide's mean
    mu(x_m): the encoder's parameter gradient is that of sum_b <mu(x_b), w_b + g_b>, and g_b is reset to zero
    while the other exemplars' stay."""
    prior, x = _deferred_prior()
    prior(torch.tensor([0])).log_prob(torch.randn(1, 2)).sum().backward()  # fills the deferred gradients
    deferred = prior._deferred.clone()
    guide, batch = prior.guide, torch.tensor([3, 4, 9])
    for p in guide.parameters():
        p.grad = None
    loc, _ = guide.net(x[batch])
    prior(batch)
    w = torch.randn_like(loc)
    (loc * w).sum().backward()
    got = [p.grad.clone() for p in guide.parameters()]
    expected = torch.autograd.grad((guide.net(x[batch])[0] * (w + deferred[batch])).sum(), list(guide.parameters()))
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)
    assert deferred[batch].abs().sum() > 0  # the check is not void
    assert (prior._deferred[batch] == 0).all()
    others = torch.ones(12, dtype=torch.bool).index_fill_(0, batch, False)
    torch.testing.assert_close(prior._deferred[others], deferred[others])


def test_deferred_gradient_is_refused_off_the_scalable_path_and_with_affine_drift():
    for settings in ({"path": "exact"}, {"path": "scalable", "drift": "affine"}, {"path": "scalable",
                                                                                   "gradient": "other"}):
        settings = {"gradient": "deferred", **settings}
        with pytest.raises(ValueError, match="gradient"):
            ExemplarPrior(AmortizedNormalGuide(5, [6], 2), torch.rand(12, 5), neighbors=2, subset=12, **settings)


def _take_and_fit_deferred(rank: int, world: int, port: int, out: str) -> None:
    with process_group(rank, world, port):
        prior, _ = _deferred_prior()
        base = torch.arange(24.0).reshape(12, 2)
        prior._deferred = (rank + 1) * base  # what each rank's own steps deferred
        index = torch.tensor([[1, 4, 6], [2, 9]][rank])  # disjoint batches of unequal size
        taken = prior._take_deferred(index)
        pyro.set_rng_seed(0)
        data = _tiny_digits(train=40)
        data = replace(data, val=replace(data.val, x=data.val.x[:2], labels=data.val.labels[:2]))
        pair = _scalable_pair(data, exemplar_components="epoch", exemplar_gradient="deferred")
        fit(pair, data, SVIConfig(epochs=2, batch_size=7), seed=1, progress=False)  # uneven shards: 4 + 3
        torch.save({"taken": taken, "left": prior._deferred, "params": [p.detach() for p in pair.model.parameters()],
                    "deferred": pair.model.prior._deferred}, Path(out) / f"rank{rank}.pt")


@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                    reason="this torch build has no torch.distributed with the gloo backend")
def test_under_two_ranks_each_takes_its_batchs_deferred_gradients_summed_over_the_ranks_and_fit_trains(tmp_path):
    """Each rank's buffer holds what its own steps deferred: a rank's batch gets the sum over both buffers, every
    rank's batch rows are cleared in both, the other rows stay; a fit with deferred gradients keeps the ranks'
    parameters equal (DDP) and defers something."""
    spawn_gloo(_take_and_fit_deferred, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    base = torch.arange(24.0).reshape(12, 2)
    torch.testing.assert_close(ranks[0]["taken"], 3 * base[[1, 4, 6]])
    torch.testing.assert_close(ranks[1]["taken"], 3 * base[[2, 9]])
    cleared = torch.zeros(12, dtype=torch.bool).index_fill_(0, torch.tensor([1, 4, 6, 2, 9]), True)
    for r in range(2):
        assert (ranks[r]["left"][cleared] == 0).all()
        torch.testing.assert_close(ranks[r]["left"][~cleared], (r + 1) * base[~cleared])
    for a, b in zip(ranks[0]["params"], ranks[1]["params"], strict=True):
        torch.testing.assert_close(a, b)
    assert ranks[0]["deferred"].abs().sum() > 0


def test_a_config_with_deferred_gradients_builds_the_exact_path_too_which_needs_no_deferral():
    """The MNIST configs set exemplar_gradient = "deferred"; with few training points (path "auto" -> exact, or
    the benchmark's exact path) the pair still builds, with the exact path's own gradients."""
    data = _tiny_digits(train=40)
    cfg = ModelConfig(hidden=[8], latent_dim=3, exemplar_gradient="deferred")
    assert get_variant("vae-exemplar").factory(data, cfg, "bernoulli").model.prior.gradient == "none"
    scalable = _scalable_pair(data, exemplar_components="epoch", exemplar_gradient="deferred")
    assert scalable.model.prior.gradient == "deferred"
