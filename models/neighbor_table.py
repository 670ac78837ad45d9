"""An approximate k-nearest-neighbour table over N vectors that move: the exemplar prior's head.

A table is an (N, k) tensor of indices: for each point, k distinct other points (never itself) that are about its
nearest by Euclidean distance between the vectors ``loc`` given at each call, so it follows vectors that change
between calls. It starts random and is improved in place by NN-descent sweeps (Dong et al. 2011) and by merging in
candidates a caller meets anyway (an estimate's tail draws); no operation searches all N.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F


def random_table(n: int, k: int, device: torch.device, generator: torch.Generator) -> torch.Tensor:
    """(N, k): k distinct random neighbours per point, other than the point itself."""
    if not 1 <= k <= n - 1:
        raise ValueError(f"a neighbour table needs 1 <= k <= N-1, got k={k}, N={n}")
    # n + 1 + ((r_n + j) mod (N-1)) mod N for j < k: distinct, and never n
    offset = torch.randint(0, n - 1, (n, 1), device=device, generator=generator) + torch.arange(k, device=device)
    return (torch.arange(n, device=device)[:, None] + 1 + offset % (n - 1)) % n


@torch.no_grad()
def sweep(table: torch.Tensor, loc: torch.Tensor, pool: int, generator: torch.Generator, width: int | None = None,
          chunk: int = 256) -> float:
    """One NN-descent sweep over all points (Dong et al. 2011): each row becomes the k nearest of itself, its
    reverse neighbours (up to k points whose rows hold it, drawn at random), the rows and reverse rows of its
    ``width`` first neighbours (all k by default), and the k nearest of ``pool`` random points. Reverse neighbours
    make it converge in a few sweeps where forward ones alone take many; all k rows rather than 5 raise the recall
    it settles at from 0.93 to 0.97 for 1.3x the time (BENCHMARKS.md section 2). Returns the share of the table's
    entries that are new (NN-descent's update count over N k: near 0 once the table has converged)."""
    n, sq_norm, width = loc.shape[0], loc.pow(2).sum(1), table.shape[1] if width is None else width
    back = reverse_rows(table, generator)
    new = 0
    for index in torch.arange(n, device=loc.device).split(chunk):
        near, old = table[index, :width], table[index]
        candidates = torch.cat([old, back[index], rows(table, near).flatten(1), rows(back, near).flatten(1)], 1)
        merge(table, index, candidates, torch.randint(0, n, (pool,), device=loc.device, generator=generator), loc,
              sq_norm)
        new += int((table[index][:, :, None] != old[:, None, :]).all(-1).sum())
    return new / table.numel()


def reverse_rows(table: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(N, k): for each point up to k points whose rows hold it, drawn at random; a point listed by fewer keeps its
    own row's first entries in the remaining places."""
    n, k = table.shape
    order = torch.randperm(n * k, device=table.device, generator=generator)
    held, holder = table.flatten()[order], torch.div(order, k, rounding_mode="floor")
    by_held = torch.argsort(held, stable=True)
    held, holder = held[by_held], holder[by_held]
    counts = torch.bincount(held, minlength=n)
    place = torch.arange(n * k, device=table.device) - (torch.cumsum(counts, 0) - counts)[held]
    back = table.clone()
    keep = place < k
    back[held[keep], place[keep]] = holder[keep]
    return back


@torch.no_grad()
def merge(table: torch.Tensor, index: torch.Tensor, candidates: torch.Tensor, pool: torch.Tensor, loc: torch.Tensor,
          sq_norm: torch.Tensor) -> None:
    """Each point's row becomes the k nearest of its own ``candidates`` (B, L; its row among them keeps a row
    from getting longer) and of the k points of the shared ``pool`` (M,) nearest to it."""
    k = table.shape[1]
    near = squared_distances(loc, sq_norm, index, pool).topk(k, dim=1, largest=False)
    keep_nearest(table, index, torch.cat([candidates, pool[near.indices]], 1),
                 torch.cat([squared_distances(loc, sq_norm, index, candidates), near.values], 1))


def keep_nearest(table: torch.Tensor, index: torch.Tensor, pool: torch.Tensor, d2: torch.Tensor) -> None:
    """Set each point's row to the k nearest distinct points (other than itself) in ``pool`` (B, L), whose squared
    distances are ``d2`` (B, L)."""
    d2 = d2.masked_fill(pool == index[:, None], math.inf)
    ids, order = pool.sort(dim=1)
    d2 = d2.gather(1, order)
    d2[:, 1:].masked_fill_(ids[:, 1:] == ids[:, :-1], math.inf)  # each point counted once
    table[index] = ids.gather(1, d2.topk(table.shape[1], dim=1, largest=False).indices)


def squared_distances(loc: torch.Tensor, sq_norm: torch.Tensor, index: torch.Tensor,
                      other: torch.Tensor) -> torch.Tensor:
    """|loc_n - loc_m|^2 by the quadratic expansion (``sq_norm`` = |loc|^2 per row): (B, M) for ``other`` (M,)
    shared by the batch, (B, L) for ``other`` (B, L) per point."""
    query = loc[index]
    if other.dim() == 1:
        cross = query @ loc[other].T
    else:
        cross = torch.bmm(rows(loc, other), query[:, :, None]).squeeze(-1)
    return sq_norm[index][:, None] - 2 * cross + sq_norm.take(other)


def rows(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``table[index]`` for a 2-D ``table`` and an index of any shape, by ``embedding`` (a row copy): on the CPU
    several times faster than advanced indexing with a 2-D index."""
    return F.embedding(index, table)


def not_in(sorted_ids: torch.Tensor, excluded: torch.Tensor, num_ids: int) -> torch.Tensor:
    """(B, M) mask: sorted_ids[m] not in excluded[b] (B, E), for ids in 0..num_ids-1. Each distinct id of
    ``sorted_ids`` gets a slot through a dense (num_ids,) lookup, the slots each row excludes are cleared, and the
    mask is read back per entry: gathers and one scatter, where a bisection (``searchsorted``) costs several times
    more on the CPU."""
    unique, inverse = torch.unique_consecutive(sorted_ids, return_inverse=True)
    slot = torch.full((num_ids,), unique.shape[0], dtype=torch.long, device=sorted_ids.device)  # the last: no slot
    slot[unique] = torch.arange(unique.shape[0], device=sorted_ids.device)
    keep = torch.ones(excluded.shape[0], unique.shape[0] + 1, dtype=torch.bool, device=sorted_ids.device)
    keep.scatter_(1, slot[excluded], False)
    return keep[:, inverse]
