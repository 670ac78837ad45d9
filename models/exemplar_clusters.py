"""A k-means partition of the exemplar prior's components and the proposal around z it gives the estimate's tail.

Late in a long MNIST run the head (a point's 2-hop neighbourhood in the table) misses mass that lies near z but
outside it, and a uniform tail of 512 rarely draws those exemplars: the estimate is 0.1-0.15 nats low
(BENCHMARKS.md section 2). ``ExemplarPrior(clusters=C)`` adds to the uniform tail per-point draws from a proposal
that follows z: a cluster c with probability w_c(z) proportional to |c| N(z; centre_c, diag v_c), v_c the
cluster's mean component variance plus its members' spread around the centre, per dimension; then a member of c
uniformly. The uniform and the clustered draws are combined by multiple importance sampling with the balance
heuristic (Veach & Guibas 1995): each draw m weighs r_m(z) / (M_u pi_u(m) + M_c pi_c(m | z)), which is unbiased
for the sum over the exemplars outside the head whatever the proposal, and bounded by the uniform part wherever the
clusters miss. The weights then sum to one only on average, so the mixture keeps their sum (``unnormalized``).
``Clusters.members_near`` serves ``ExemplarPrior(probe=t)`` instead: every member of the t clusters nearest to z,
scored exactly in the head (an inverted-file search).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Clusters:
    """A partition of N components: ``centres`` (C, D), each component's cluster ``assign`` (N,), the members
    listed cluster by cluster (``order`` (N,), cluster c at ``starts[c]`` with ``sizes[c]`` members), and each
    cluster's ``log_size`` (-inf when empty) and ``variance`` (C, D): its members' mean variance plus their spread
    around the centre, per dimension (the proposal's width)."""

    centres: torch.Tensor
    assign: torch.Tensor
    order: torch.Tensor
    starts: torch.Tensor
    sizes: torch.Tensor
    log_size: torch.Tensor
    variance: torch.Tensor
    sorted_loc: torch.Tensor  # the components' means in ``order``: each cluster's rows together
    sorted_sq_norm: torch.Tensor

    def log_weights(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C): log w_c(z), the normalized log-probability of each cluster for each z (B, D)."""
        precision = self.variance.reciprocal()  # (C, D)
        sq = z.pow(2) @ precision.T - 2 * z @ (self.centres * precision).T + (self.centres.pow(2) * precision).sum(1)
        log_w = self.log_size - 0.5 * sq.clamp_min(0) - 0.5 * self.variance.log().sum(1)
        return log_w - log_w.logsumexp(1, keepdim=True)

    def draw(self, log_w: torch.Tensor, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, count) component ids: for each row of ``log_w`` a cluster by its weight, then a member uniformly."""
        cluster = torch.multinomial(log_w.exp(), count, replacement=True, generator=generator)
        size = self.sizes[cluster]
        within = (torch.rand(cluster.shape, device=cluster.device, generator=generator) * size).long()
        return self.order[self.starts[cluster] + within.minimum(size - 1)]

    def members_near(self, z: torch.Tensor, probes: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``probes`` clusters whose centres are nearest to each z (B, D), an inverted-file search: (B, W) ids
        of all their members, each row padded to the longest with -1, and (B, probes) the clusters."""
        row, position, top = self._probed(z, probes)
        return pad_rows(row, self.order.index_select(0, position), z.shape[0], -1), top

    def nearest_members(self, z: torch.Tensor, probes: int
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``members_near`` as a ragged list: (row (L,), id (L,), |loc|^2 - 2 z.loc (L,)) for every member of the
        ``probes`` clusters nearest to each z (B, D), so no row is padded to the longest (on a trained encoder z
        falls in the large clusters: probed rows hold 220 members at the median and 800 at most). Each cluster's
        means are read as one run of ``sorted_loc``, about 4x faster than gathering rows scattered over N. Also
        returns the (B, probes) clusters."""
        row, position, top = self._probed(z, probes)
        dot = (self.sorted_loc.index_select(0, position) * z.index_select(0, row)).sum(-1)
        return row, self.order.index_select(0, position), self.sorted_sq_norm.index_select(0, position) - 2 * dot, top

    def _probed(self, z: torch.Tensor, probes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The members of the ``probes`` clusters nearest to each z (B, D), ragged: each one's row of z (L,) and its
        position in ``order`` (L,), row by row and cluster by cluster; and the (B, probes) clusters."""
        distance = torch.addmm(self.centres.pow(2).sum(1), z, self.centres.T, alpha=-2)  # up to |z|^2
        top = distance.topk(min(probes, self.centres.shape[0]), 1, largest=False, sorted=False).indices  # (B, t)
        flat = top.flatten()  # (index_select throughout: several times faster than advanced indexing here)
        size = self.sizes.index_select(0, flat)
        run = torch.repeat_interleave(torch.arange(size.shape[0], device=z.device), size)  # each member's (b, cluster)
        shift = (self.starts.index_select(0, flat) - size.cumsum(0) + size).index_select(0, run)
        position = shift + torch.arange(run.shape[0], device=z.device)
        return run.div(top.shape[1], rounding_mode="floor"), position, top

    def log_prob(self, log_w: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """log pi_c(m | z) for ids (B, M) under the proposal of each row of ``log_w`` (B, C)."""
        cluster = self.assign[ids]
        return log_w.gather(1, cluster) - self.log_size[cluster]


def pad_rows(row: torch.Tensor, values: torch.Tensor, rows: int, fill: float) -> torch.Tensor:
    """A ragged list (``values`` (L,) of rows ``row`` (L,), in row order) as a (rows, W) tensor, each row padded
    with ``fill`` to the longest (W >= 1)."""
    count = torch.bincount(row, minlength=rows)
    column = torch.arange(row.shape[0], device=row.device) - (count.cumsum(0) - count).index_select(0, row)
    width = max(1, int(count.max())) if rows else 1
    return values.new_full((rows, width), fill).index_put_((row, column), values)


@torch.no_grad()
def fit_clusters(loc: torch.Tensor, variance: torch.Tensor, count: int, generator: torch.Generator,
                 centres: torch.Tensor | None = None, iterations: int = 3, chunk: int = 8192) -> Clusters:
    """k-means (Lloyd's iterations) of the components' means ``loc`` (N, D), started from ``centres`` (the last
    renewal's, when their shape fits) or from ``count`` random components; ``variance`` (N, D) is the components'.
    Deterministic given the generator, so ranks that share the components agree."""
    n, d = loc.shape
    count = min(count, n)
    if centres is None or centres.shape != (count, d):
        centres = loc[torch.randperm(n, device=loc.device, generator=generator)[:count]].clone()
    else:
        centres = centres.clone()
    for step in range(iterations + 1):
        assign = _nearest(loc, centres, chunk)
        sizes = torch.bincount(assign, minlength=count)
        if step == iterations:
            break
        sums = torch.zeros_like(centres).index_add_(0, assign, loc)
        filled = sizes > 0
        centres[filled] = sums[filled] / sizes[filled, None].to(loc.dtype)
        _relocate_empty(loc, centres, assign, ~filled)
    spread = (loc - centres[assign]).pow(2) + variance  # (N, D)
    mean_spread = torch.zeros_like(centres).index_add_(0, assign, spread) / sizes.clamp_min(1)[:, None].to(loc.dtype)
    order = torch.argsort(assign, stable=True)
    starts = sizes.cumsum(0) - sizes
    log_size = torch.where(sizes > 0, sizes.to(loc.dtype).log(), -math.inf)
    sorted_loc = loc[order]
    return Clusters(centres, assign, order, starts, sizes, log_size, mean_spread.clamp_min(1e-6), sorted_loc,
                    sorted_loc.pow(2).sum(1))


def _relocate_empty(loc: torch.Tensor, centres: torch.Tensor, assign: torch.Tensor, empty: torch.Tensor) -> None:
    """Move the centres of ``empty`` clusters onto the components farthest from their own centre (as
    scikit-learn's k-means does). Warm starts make this matter: as the encoder moves the codes, centres left
    behind by the last renewal get no member and would stay empty for the rest of the run (142 of 256 at the
    end of a CPU-budget MNIST run), leaving fewer, wider clusters for the proposal."""
    count = int(empty.sum())
    if count == 0:
        return
    far = (loc - centres[assign]).pow(2).sum(1).topk(min(count, loc.shape[0])).indices
    centres[empty.nonzero().squeeze(1)[: far.shape[0]]] = loc[far]


def _nearest(loc: torch.Tensor, centres: torch.Tensor, chunk: int) -> torch.Tensor:
    sq = centres.pow(2).sum(1)
    return torch.cat([(sq - 2 * part @ centres.T).argmin(1) for part in loc.split(chunk)])


@torch.no_grad()
def draw_near(clusters: Clusters, count: int, z: torch.Tensor, generator: torch.Generator | None,
              index: torch.Tensor, head: torch.Tensor, head_logits: torch.Tensor, tail: torch.Tensor,
              in_tail: torch.Tensor, pool_size: int, log_share: float | torch.Tensor, kept: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The estimate's tail for training points ``index`` at z (B, D) by multiple importance sampling: the M_u
    uniform draws ``tail`` from a pool of ``pool_size`` (``in_tail``: those outside n and the head) and ``count``
    draws per point from the clusters' proposal around z, appended to the ``head`` (B, H), whose members keep their
    ``head_logits`` (log 1/others = ``log_share``). Each draw m gets log_share - log(M_u / |pool| + M_c pi_c(m | z));
    draws of n, of head members or outside ``kept`` (an (N,) mask) get -inf. Returns (head and draws, their
    logits, the uniform draws' (B, M_u) logits). The proposal takes no gradient: given z the estimate is unbiased
    for the density and its gradient alike."""
    log_w = clusters.log_weights(z.detach().to(clusters.centres.dtype))
    drawn = clusters.draw(log_w, count, generator)  # (B, M_c)
    log_uniform = torch.tensor(math.log(tail.shape[0] / pool_size), dtype=log_w.dtype, device=log_w.device)

    def logits(ids: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
        balance = torch.logaddexp(log_uniform, math.log(count) + clusters.log_prob(log_w, ids))
        return torch.where(used, log_share - balance, -math.inf).to(head_logits.dtype)

    b, n = index.shape[0], clusters.assign.shape[0]
    taken = torch.zeros(b, n, dtype=torch.bool, device=index.device)
    taken.scatter_(1, head, True).scatter_(1, index[:, None], True)  # a dense map: 10x a pairwise comparison
    used = ~taken.gather(1, drawn)
    if kept is not None:
        used &= kept[drawn]
    tail_logits = logits(tail.expand(b, -1), in_tail)
    return torch.cat([head, drawn], 1), torch.cat([head_logits, logits(drawn, used)], 1), tail_logits
