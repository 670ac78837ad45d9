"""The neighbour table: rows of k distinct other points, made exact by a step that sees every point, and kept
exact by merges (checked against a brute-force search)."""

from __future__ import annotations

import pytest
import torch

from vae_priors.models.neighbor_table import keep_nearest, merge, random_table, reverse_rows, squared_distances, sweep


def brute_force(loc: torch.Tensor, k: int) -> torch.Tensor:
    d2 = torch.cdist(loc, loc).pow(2).fill_diagonal_(float("inf"))
    return d2.topk(k, dim=1, largest=False).indices.sort(1).values


@pytest.fixture
def points() -> tuple[torch.Tensor, torch.Tensor]:
    loc = torch.randn(200, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return loc, loc.pow(2).sum(-1)


def test_a_random_table_has_k_distinct_neighbours_per_point_and_never_the_point_itself():
    table = random_table(50, 7, torch.device("cpu"), torch.Generator().manual_seed(1))
    assert table.shape == (50, 7)
    assert not (table == torch.arange(50)[:, None]).any()
    assert all(len(set(row.tolist())) == 7 for row in table)
    with pytest.raises(ValueError, match="1 <= k <= N-1"):
        random_table(5, 5, torch.device("cpu"), torch.Generator())


def test_squared_distances_equal_the_direct_ones_for_shared_and_per_point_candidates(points):
    loc, sq_norm = points
    index, shared, per_point = torch.tensor([0, 3]), torch.tensor([1, 2, 5]), torch.tensor([[4, 7], [9, 0]])
    direct = torch.cdist(loc[index], loc[shared]) ** 2
    torch.testing.assert_close(squared_distances(loc, sq_norm, index, shared), direct)
    direct = (loc[index][:, None] - loc[per_point]).pow(2).sum(-1)
    torch.testing.assert_close(squared_distances(loc, sq_norm, index, per_point), direct)


def test_a_merge_whose_pool_is_every_other_point_finds_the_exact_nearest(points):
    loc, sq_norm = points
    table = random_table(200, 4, loc.device, torch.Generator().manual_seed(2))
    for i in range(200):
        merge(table, torch.tensor([i]), table[[i]].clone(), torch.cat([torch.arange(i), torch.arange(i + 1, 200)]),
              loc, sq_norm)
    assert torch.equal(table.sort(1).values, brute_force(loc, 4))


def test_reverse_rows_hold_only_points_whose_rows_hold_the_point_and_all_of_them_when_few():
    table = random_table(60, 3, torch.device("cpu"), torch.Generator().manual_seed(4))
    back = reverse_rows(table, torch.Generator().manual_seed(5))
    for point in range(60):
        holders = {m for m in range(60) if point in table[m].tolist()}
        listed = back[point].tolist()
        real = [m for m in listed if m in holders]
        assert len(set(real)) == min(3, len(holders))  # every holder when at most k, else k distinct ones
        assert all(m in holders or m in table[point].tolist() for m in listed)  # the rest: the point's own row


def test_sweeps_never_lengthen_a_row_and_raise_recall_within_a_few_sweeps(points):
    loc, sq_norm = points
    rng = torch.Generator().manual_seed(3)
    table = random_table(200, 4, loc.device, rng)
    exact = brute_force(loc, 4)

    def recall() -> float:
        return (table[:, :, None] == exact[:, None, :]).any(-1).double().mean().item()

    def row_lengths() -> torch.Tensor:
        return squared_distances(loc, sq_norm, torch.arange(200), table).sum(1)

    before, lengths = recall(), row_lengths()
    for _ in range(4):
        sweep(table, loc, pool=16, generator=rng, width=2, chunk=64)
        shorter = row_lengths()
        assert (shorter <= lengths + 1e-12).all()  # a row's own neighbours are among its candidates
        lengths = shorter
    assert before < 0.05 and recall() > 0.8  # forward neighbours alone needed 8 sweeps for 0.75 here


def test_merge_keeps_the_nearest_of_the_old_row_and_the_pool(points):
    loc, sq_norm = points
    exact = brute_force(loc, 3)
    table = exact.clone()
    table[:, 2] = (torch.arange(200) + 100) % 200  # one wrong neighbour per row
    for i in range(200):  # a pool holding the right one among others
        pool = torch.cat([exact[i, 2:], torch.tensor([(i + 7) % 200, (i + 50) % 200])])
        merge(table, torch.tensor([i]), table[[i]].clone(), pool, loc, sq_norm)
    assert torch.equal(table.sort(1).values, exact)


def test_keep_nearest_counts_a_repeated_candidate_once_and_never_keeps_the_point_itself():
    table = torch.zeros(3, 2, dtype=torch.long)
    pool = torch.tensor([[0, 1, 1, 2]])
    keep_nearest(table, torch.tensor([0]), pool, torch.tensor([[0.0, 1.0, 1.0, 2.0]]))
    assert sorted(table[0].tolist()) == [1, 2]
