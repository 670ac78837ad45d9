"""The k-means partition of the exemplar prior's cache and the tail it draws around z (``clusters`` > 0): a
partition whatever the data, a proposal whose draws follow its stated probabilities, an estimate still unbiased in
density (with and without exemplar subsampling), and one closer to the exact mixture where the head misses mass."""

from __future__ import annotations

import math

import pyro
import pytest
import torch

from tests.test_distributed import _tiny_digits
from tests.test_exemplar_prior import _loo_logits, _scalable_pair, _step, _subset_logits
from tests.test_mixture_priors import LinearEncoder, brute_force_mixture
from vae_priors.experiments.config import SVIConfig
from vae_priors.experiments.training.svi import fit
from vae_priors.models.exemplar_clusters import fit_clusters
from vae_priors.models.exemplar_prior import ExemplarPrior


def _blobs(per_blob: int = 50, centres: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    truth = 10 * torch.randn(centres, 2, generator=generator)
    label = torch.arange(centres).repeat_interleave(per_blob)
    return truth[label] + 0.3 * torch.randn(len(label), 2, generator=generator), label


def test_clusters_partition_the_components_and_list_each_clusters_members_together():
    x, _ = _blobs()
    clusters = fit_clusters(x, torch.full_like(x, 0.1), 7, torch.Generator().manual_seed(0))
    assert sorted(clusters.order.tolist()) == list(range(len(x)))  # each component listed once
    assert int(clusters.sizes.sum()) == len(x)
    for c in range(7):
        members = clusters.order[clusters.starts[c] : clusters.starts[c] + clusters.sizes[c]]
        assert (clusters.assign[members] == c).all()
        if clusters.sizes[c] == 0:
            assert clusters.log_size[c] == -math.inf


def test_kmeans_finds_well_separated_blobs_and_is_the_same_for_the_same_generator():
    """Four blobs 10 apart with spread 0.3: each cluster is one blob (started from random members, a few
    iterations); the same generator gives the same partition (ranks sharing the cache share it)."""
    x, label = _blobs()
    first = fit_clusters(x, torch.full_like(x, 0.1), 4, torch.Generator().manual_seed(3), iterations=10)
    again = fit_clusters(x, torch.full_like(x, 0.1), 4, torch.Generator().manual_seed(3), iterations=10)
    assert torch.equal(first.assign, again.assign) and torch.equal(first.centres, again.centres)
    pairs = set(zip(label.tolist(), first.assign.tolist(), strict=True))
    assert len(pairs) == 4 and len({c for _, c in pairs}) == 4


def test_kmeans_moves_centres_left_without_members_onto_the_farthest_components():
    """Warm-started from centres of which half lie far from every component (codes that moved since the last
    renewal): after the iterations no cluster is empty, where keeping such centres would leave them so."""
    x, _ = _blobs()
    start = fit_clusters(x, torch.full_like(x, 0.1), 8, torch.Generator().manual_seed(0)).centres
    start[4:] += 1000.0
    clusters = fit_clusters(x, torch.full_like(x, 0.1), 8, torch.Generator().manual_seed(0), centres=start)
    assert (clusters.sizes > 0).all(), clusters.sizes


def test_members_near_lists_every_member_of_the_clusters_nearest_to_z_and_nothing_else():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(500, 4, generator=generator)
    clusters = fit_clusters(x, torch.full_like(x, 0.1), 12, generator)
    z = torch.randn(6, 4, generator=generator)
    members, top = clusters.members_near(z, 3)
    nearest = torch.cdist(z, clusters.centres).topk(3, 1, largest=False).indices
    for row, listed, probed in zip(nearest, members, top, strict=True):
        assert set(probed.tolist()) == set(row.tolist())
        got, want = listed[listed >= 0].tolist(), torch.isin(clusters.assign, row).nonzero().flatten().tolist()
        assert len(got) == len(set(got)) and set(got) == set(want)
        assert (listed[len(got):] == -1).all()  # padding only after the members


def test_the_proposals_draws_follow_its_stated_probabilities():
    """Frequencies of 40 000 draws per z against exp(log_prob) over all components (within 5 standard errors),
    and the stated probabilities sum to one over the components."""
    x, _ = _blobs(per_blob=8, centres=3)
    clusters = fit_clusters(x, torch.full_like(x, 0.5), 5, torch.Generator().manual_seed(0))
    z = torch.tensor([[0.0, 0.0], [5.0, -5.0]])
    log_w = clusters.log_weights(z)
    every = torch.arange(len(x)).expand(2, -1)
    stated = clusters.log_prob(log_w, every).exp()
    torch.testing.assert_close(stated.sum(1), torch.ones(2, dtype=stated.dtype))
    draws = clusters.draw(log_w, 40_000, torch.Generator().manual_seed(1))
    counts = torch.stack([torch.bincount(row, minlength=len(x)) for row in draws]).double() / 40_000
    standard_error = (stated * (1 - stated) / 40_000).sqrt().double()
    assert ((counts - stated.double()).abs() <= 5 * standard_error + 1e-9).all()


AROUND_Z = [{"cluster_draws": 5}, {"cluster_draws": 0, "probe": 1, "clusters": 12}, {"cluster_draws": 5, "probe": 1},
            {"cluster_draws": 0, "probe": 2, "clusters": 12, "nearest": 2, "spread": 1.0},
            {"clusters": 0, "nearest": 2, "spread": 1.0}]  # (wider components: a 2-point head leaves mass to the tail)


def _clustered_prior(n: int, subset: int, keep: float = 1.0, clusters: int = 6, spread: float = 0.3,
                     **around_z: int) -> tuple[ExemplarPrior, torch.Tensor]:
    torch.manual_seed(0)
    x = 3 * torch.randn(n, 2)
    around_z = around_z or {"cluster_draws": 5}
    prior = ExemplarPrior(LinearEncoder(2, spread), x, path="scalable", neighbors=3, subset=subset, components="epoch",
                          hops=2, sweeps=8, keep=keep, clusters=clusters, **around_z).train()
    return prior, x


@pytest.mark.parametrize("around_z", AROUND_Z)
@pytest.mark.parametrize("keep", [1.0, 0.5])
def test_with_draws_or_probes_around_z_the_estimate_is_unbiased_in_density(keep, around_z):
    """Uniform tail draws (8 among 40) with draws around z from the clusters, weighed by the balance heuristic,
    and/or the members of the clusters nearest to z in the head: the mean estimated density over many draws is
    the exact leave-one-out density (over the step's subset S less n with keep 0.5), for z near and far from
    the points."""
    prior, x = _clustered_prior(40, 8, keep, **around_z)
    index = torch.tensor([3, 17, 30])
    prior(index)
    kept = prior._draw_kept()
    z = torch.cat([x[index[:1]] + 0.2, 3 * torch.randn(2, 2)])
    generator = torch.Generator().manual_seed(1)
    densities = torch.stack([prior._estimate(index, False, generator, kept).log_prob(z).double().exp()
                             for _ in range(4000)])
    logits = _loo_logits(index, 40) if kept is None else _subset_logits(index, kept[1])
    exact = brute_force_mixture(z, logits, x, torch.full((40, 2), around_z.get("spread", 0.3))).exp()
    standard_error = densities.std(0) / math.sqrt(len(densities))
    # (float32 rounding where the head holds almost all of the mass and the draws barely vary)
    bound = 4 * standard_error + 1e-5 * exact
    assert ((densities.mean(0) - exact).abs() < bound).all(), (densities.mean(0), exact, standard_error)
    assert (standard_error > 0).any()  # the draws vary (a wide head can hold all of a point's mass at z)


@pytest.mark.parametrize("around_z", AROUND_Z)
def test_with_the_tail_over_all_n_the_clusters_are_not_drawn_and_the_estimate_is_exact(around_z):
    prior, x = _clustered_prior(30, 30, **around_z)
    index = torch.tensor([0, 11, 29])
    z = 3 * torch.randn(3, 2)
    exact = brute_force_mixture(z, _loo_logits(index, 30), x, torch.full((30, 2), around_z.get("spread", 0.3)))
    torch.testing.assert_close(prior(index).log_prob(z).double(), exact, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("around_z", AROUND_Z[:2])
def test_draws_or_probes_around_z_bring_the_estimate_closer_where_the_head_misses_the_mass_near_z(around_z):
    """Clustered exemplars, z far from training point n's neighbourhood: the nearest mass to z is outside the
    2-hop head, and a uniform tail of 16 among 2 000 rarely draws it. Draws around z, or the members of z's
    nearest clusters in the head, cut the mean |error| at least in half."""
    torch.manual_seed(0)
    x, _ = _blobs(per_blob=100, centres=20, seed=1)
    index = torch.arange(0, 2000, 10)
    z = x[torch.randperm(2000)[:200]] + 0.3 * torch.randn(200, 2)
    errors = {}
    exact = brute_force_mixture(z, _loo_logits(index, 2000), x, torch.full((2000, 2), 0.3))  # (slow: computed once)
    for clusters in (0, 40):
        settings = {"cluster_draws": 16, **around_z, "clusters": clusters} if clusters else {}
        prior = ExemplarPrior(LinearEncoder(2, 0.3), x, path="scalable", neighbors=3, subset=16,
                              components="epoch", hops=2, sweeps=8, **settings).train()
        prior(index)
        estimate = prior._estimated_log_prob(index, z, torch.Generator().manual_seed(2))
        errors[clusters] = (estimate.double() - exact).abs().mean().item()
    assert errors[40] < 0.5 * errors[0], errors


def test_a_checkpoint_keeps_the_centres_and_a_loaded_prior_draws_the_same_estimate():
    pyro.set_rng_seed(0)
    data = _tiny_digits(train=40)
    pair = _scalable_pair(data, exemplar_components="epoch", exemplar_hops=2, exemplar_clusters=4,
                          exemplar_cluster_draws=3)
    _step(pair, data.train.x, torch.arange(5))
    prior = pair.model.prior
    assert prior._clusters is not None
    other = _scalable_pair(data, exemplar_components="epoch", exemplar_hops=2, exemplar_clusters=4,
                           exemplar_cluster_draws=3)
    other.model.load_state_dict(pair.model.state_dict())
    loaded = other.model.prior
    assert torch.equal(loaded._clusters.assign, prior._clusters.assign)
    z, index = torch.randn(4, 3), torch.tensor([1, 8, 20, 33])
    estimates = [p._estimated_log_prob(index, z, torch.Generator().manual_seed(4)) for p in (prior, loaded)]
    torch.testing.assert_close(*estimates)


@pytest.mark.parametrize("keep", [1.0, 0.5])
def test_nearest_keeps_in_the_head_the_candidates_nearest_to_z_and_leaves_out_n_repeats_and_the_unkept(keep):
    """``nearest`` = 3 of 2-hop heads (with repeats) and the members of 2 clusters: each row keeps the 3 candidates
    nearest to z by brute force among those that are not n and are in the step's subset, each once."""
    prior, x = _clustered_prior(60, 8, keep, cluster_draws=0, probe=2, clusters=12, nearest=3)
    index = torch.tensor([3, 17, 30, 44])
    prior(index)
    kept = prior._draw_kept()
    mask = None if kept is None else kept[1]
    z = x[index] + 0.5 * torch.randn(4, 2)
    head = torch.cat([prior._table[index], prior._table[prior._table[index]].flatten(1)], 1)
    members, _ = prior._clusters.members_near(z, 2)
    chosen, dropped = prior._ranked_head(index, head, True, z, mask)
    for row, n in enumerate(index.tolist()):
        pool = set(head[row].tolist()) | set(members[row].tolist()) - {-1}
        pool = [m for m in pool if m != n and (mask is None or mask[m])]
        want = sorted(pool, key=lambda m: float((x[m] - z[row]).pow(2).sum()))[:3]
        kept_ids = chosen[row][~dropped[row]].tolist()
        assert len(kept_ids) == len(set(kept_ids)) and sorted(kept_ids) == sorted(want)


@pytest.mark.parametrize("settings", [{"clusters": -1}, {"clusters": 4, "cluster_draws": 0},
                                      {"clusters": 4, "drift": "affine"}, {"probe": 2},
                                      {"clusters": 4, "probe": -1}])
def test_negative_clusters_neither_draws_nor_probes_probes_without_clusters_or_affine_drift_are_refused(settings):
    with pytest.raises(ValueError, match="clusters"):
        ExemplarPrior(LinearEncoder(2, 0.7), torch.randn(12, 2), path="scalable", neighbors=2, subset=12, **settings)


@pytest.mark.parametrize("settings", [{"nearest": -1}, {"nearest": 4, "drift": "affine"}])
def test_a_negative_nearest_or_one_with_affine_drift_is_refused(settings):
    with pytest.raises(ValueError, match="nearest"):
        ExemplarPrior(LinearEncoder(2, 0.7), torch.randn(12, 2), path="scalable", neighbors=2, subset=12, **settings)


@pytest.mark.parametrize("around_z", [{"exemplar_cluster_draws": 3},
                                      {"exemplar_cluster_draws": 0, "exemplar_probe": 2},
                                      {"exemplar_cluster_draws": 0, "exemplar_probe": 2, "exemplar_nearest": 6}])
def test_fit_with_draws_or_probes_around_z_trains_and_records_the_estimates_error(around_z):
    pyro.set_rng_seed(0)
    data = _tiny_digits(train=40)
    pair = _scalable_pair(data, exemplar_components="epoch", exemplar_hops=2, exemplar_clusters=4,
                          exemplar_gradient="deferred", exemplar_keep=0.5, **around_z)
    result = fit(pair, data, SVIConfig(epochs=2, batch_size=10), progress=False)
    assert result.history["prior_error"].between(0, 50).all() and result.history["val_elbo"].notna().all()
