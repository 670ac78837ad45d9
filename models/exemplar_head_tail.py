"""The scalable exemplar prior's per-step estimate (``ExemplarPrior(path="scalable")``): the head/tail estimate of
the leave-one-out mixture from the cache and the neighbour table, and the ways its head is chosen: the table's rows
(1 or 2 hops), a search of the table around z (``landmarks``), every member of the k-means clusters nearest to z
(``probe``), only the candidates nearest to z (``nearest``), draws around z in the tail (``cluster_draws``), and
the subset of ``keep``. Given the cache each is unbiased for the mixture's density.

A mixin of ``ScalableEstimate`` (``models/exemplar_estimate.py``): it reads the prior's settings and state
(``num_exemplars``, ``subset``, ``hops``, ``_loc``, ``_table``, ``_clusters``, ...), which
``ExemplarPrior.__init__`` sets; the class docstring there describes the estimate.
"""

from __future__ import annotations

import math

import torch

from vae_priors.models.exemplar_clusters import draw_near, pad_rows
from vae_priors.models.mixture_distributions import HeadTailMixture, SearchedHeadTail
from vae_priors.models.neighbor_table import merge, not_in, rows


def compact(head: torch.Tensor, dropped: torch.Tensor, fill: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of ``head`` (B, H) with its members (not ``dropped``) first, in order, cut at the fullest row:
    (B, W) ids and their dropped mask, the padding set to ``fill`` (B,), an id the caller excludes anyway. Less to
    score and to backpropagate than the full width; a scatter, where a stable sort of the mask costs more."""
    member = ~dropped
    count = member.sum(1, keepdim=True)
    width = max(1, int(count.max()))
    slot = torch.where(member, member.cumsum(1) - 1, width)  # dropped entries all land in a spare last column
    out = fill[:, None].expand(-1, width + 1).clone().scatter_(1, slot, head)
    return out[:, :width], torch.arange(width, device=head.device) >= count


class HeadTailEstimate:
    """The per-step estimate of the scalable path: ``_estimate`` and how its head is chosen."""

    @torch.no_grad()
    def estimate_error(self, index: torch.Tensor, z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """Per training point ``index``: the training estimate of log p(z | not n) from the cache and table minus
        the exact leave-one-out value from the encodings ``loc``, ``scale`` (the table is not refined)."""
        return self._estimated_log_prob(index, z, generator) - self._exact_log_prob(index, z, loc, scale)

    def _estimated_log_prob(self, index: torch.Tensor, z: torch.Tensor, generator: torch.Generator | None
                            ) -> torch.Tensor:
        """The training estimate of log p(z | not n), in chunks of 64 points (the table is not refined)."""
        return torch.cat([self._estimate(part, refine=False, generator=generator).log_prob(at)
                          for part, at in zip(index.split(64), z.split(64), strict=True)])

    def _estimate(self, index: torch.Tensor, refine: bool, generator: torch.Generator | None = None,
                  kept: tuple[torch.Tensor, torch.Tensor] | None = None) -> HeadTailMixture | SearchedHeadTail:
        """The head/tail estimate of the leave-one-out mixture for training points ``index``, from the cache; with
        ``landmarks`` a ``SearchedHeadTail``, whose head also holds what a search around z finds. ``kept`` (its
        ids, (N,) mask) restricts the mixture to a subset S of the exemplars: head members outside S are dropped
        and the tail draws from S."""
        n = self.num_exemplars
        pool = torch.arange(n, device=index.device) if kept is None else kept[0]
        # tail: M i.i.d. uniform draws from the pool; those equal to n or in head_n are dropped, so the kept ones are
        # i.i.d. uniform over the pool's other exemplars and their mean is unbiased for the tail's mean density
        if self.subset >= len(pool):
            tail = pool  # every exemplar: exact given the cache
        else:
            tail = pool[torch.randint(0, len(pool), (self.subset,), device=index.device, generator=generator)]
        tail = tail.sort().values
        mask = None if kept is None else kept[1]
        head = self._table[index]  # (B, k), fixed before this step's draws
        if self.hops == 2:  # the rows and their rows: (B, k + k^2)
            head = torch.cat([head, rows(self._table, head).flatten(1)], 1)
        if refine and self.subset < n:  # for later visits
            merge(self._table, index, self._table[index], tail, self._loc, self._sq_norm)
        # (a tail of the whole pool is exact: no draws around z)
        clustered = self._clusters is not None and self.cluster_draws > 0 and len(tail) < len(pool)
        probing = self._clusters is not None and self.probe > 0
        if not (self.landmarks or clustered or probing or self.nearest):
            return self._head_tail(index, head, tail, self.hops == 2, mask)
        landmarks = torch.randint(0, n, (self.landmarks,), device=index.device, generator=generator) if (
            self.landmarks) else None

        def build(z: torch.Tensor) -> HeadTailMixture:  # the head and tail of this z
            searched = head if landmarks is None else self._search(head, landmarks, z)
            probed = self._clusters.members_near(z.detach(), self.probe) if probing and not self.nearest else None
            near = (z, len(pool), generator) if clustered else None
            distinct = self.hops == 2 or landmarks is not None
            if self.nearest:
                ranked = self._ranked_head(index, searched, distinct, z.detach(), mask)
                return self._head_tail(index, ranked[0], tail, False, mask, near, ranked=ranked)
            return self._head_tail(index, searched, tail, distinct, mask, near, probed)

        return SearchedHeadTail(build, lambda: self._head_tail(index, head, tail, self.hops == 2, mask),
                                index.shape[0], self._loc.shape[1])

    @torch.no_grad()
    def _ranked_head(self, index: torch.Tensor, head: torch.Tensor, distinct: bool, z: torch.Tensor,
                     kept: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``nearest`` = K: the K exemplars nearest to z (B, D) among the candidates, the ``head`` (B, H) and with
        ``probe`` every member of the clusters nearest to z, leaving out n, repeats and (``kept``, an (N,) mask)
        exemplars outside the step's subset. Returns (B, K) ids and their dropped mask (a row with fewer valid
        candidates keeps some invalid ones, dropped). Ranking costs one product over the candidates without
        gradients; scoring them all exactly would add their backward and deferred gradients, for densities
        negligible next to the nearest ones (the tail still counts them). A function of z and the cache, so the
        estimate stays unbiased given the cache."""
        if distinct:
            head = head.sort(1).values
            invalid = torch.cat([torch.zeros_like(head[:, :1], dtype=torch.bool), head[:, 1:] == head[:, :-1]], 1)
        else:
            invalid = torch.zeros_like(head, dtype=torch.bool)
        sq_norm = self._sq_norm.index_select(0, head.flatten()).view_as(head)
        score = sq_norm - 2 * torch.bmm(rows(self._loc, head), z[..., None]).squeeze(-1)  # |loc - z|^2 - |z|^2
        ids = head
        if self.probe:
            row, members, member_score, top = self._clusters.nearest_members(z, self.probe)
            cluster = self._clusters.assign.index_select(0, head.flatten()).view_as(head)
            invalid |= (cluster[..., None] == top[:, None, :]).any(-1)  # listed as members too
            members = pad_rows(row, members, head.shape[0], -1)
            ids = torch.cat([head, members.clamp_min(0)], 1)
            score = torch.cat([score, pad_rows(row, member_score, head.shape[0], math.inf)], 1)
            invalid = torch.cat([invalid, members < 0], 1)
        invalid |= ids == index[:, None]
        if kept is not None:
            invalid |= ~kept.index_select(0, ids.flatten()).view_as(ids)
        best, chosen = score.masked_fill(invalid, math.inf).topk(min(self.nearest, ids.shape[1]), 1, largest=False,
                                                                  sorted=False)
        return ids.gather(1, chosen), best.isinf()

    @torch.no_grad()
    def _search(self, head: torch.Tensor, landmarks: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``head`` (B, H) and what a greedy search of the table finds around each z (B, D): entered at the 3
        of the ``landmarks`` nearest to z, then twice the rows of the k found so far that are nearest to z. The
        table's graph is clustered, and z ~ q(z|x_n) often lies nearer to exemplars outside n's neighbourhood
        (BENCHMARKS.md section 2)."""
        loc = self._loc
        near = (self._sq_norm[landmarks] - 2 * z @ loc[landmarks].T).topk(3, 1, largest=False).indices
        entry = landmarks[near]
        found = torch.cat([entry, rows(self._table, entry).flatten(1)], 1)
        for _ in range(2):
            d2 = (rows(loc, found) - z[:, None]).pow(2).sum(-1)
            nearest = found.gather(1, d2.topk(min(self.neighbors, found.shape[1]), 1, largest=False).indices)
            found = torch.cat([found, rows(self._table, nearest).flatten(1)], 1)
        return torch.cat([head, found], 1)

    def _head_tail(self, index: torch.Tensor, head: torch.Tensor, tail: torch.Tensor, distinct: bool,
                   kept: torch.Tensor | None = None,
                   near: tuple[torch.Tensor, int, torch.Generator | None] | None = None,
                   probed: tuple[torch.Tensor, torch.Tensor] | None = None,
                   ranked: tuple[torch.Tensor, torch.Tensor] | None = None) -> HeadTailMixture:
        """The mixture of ``head`` (B, H) exactly and the sorted ``tail`` draws for the rest. ``distinct``: the
        head may repeat exemplars or hold n itself, so each is counted once and n dropped (a table row never does).
        ``kept``: an (N,) mask of the exemplars in the mixture (the tail draws only from them); None: all N.
        ``near`` (z, the pool's size, generator): the rest is also drawn around z from the clusters
        (``models/exemplar_clusters.py``), each draw weighed with the tail's by the balance heuristic. ``probed``
        (members (B, P) padded with -1, their clusters (B, t)): the head also holds every member of these clusters;
        head entries in them are dropped, since the members list them (no sort of the wider head). ``ranked``
        (``_ranked_head``'s head and dropped mask): the head as chosen there, n and the subset already applied."""
        n, b = self.num_exemplars, index.shape[0]
        # the exemplars besides n that the mixture is over: N - 1, or |S| less n where n is in S
        others, dropped = n - 1, None
        if ranked is not None:
            head, dropped = ranked
        elif distinct:
            head = head.sort(1).values
            repeated = torch.cat([torch.zeros_like(head[:, :1], dtype=torch.bool), head[:, 1:] == head[:, :-1]], 1)
            dropped = repeated | (head == index[:, None])
        if kept is not None:
            if ranked is None:
                dropped = ~kept[head] if dropped is None else dropped | ~kept[head]
            others = (kept.sum() - kept[index].long())[:, None].to(self._loc.dtype)
        if probed is not None:
            members, top = probed
            clusters = self._clusters.assign.index_select(0, head.reshape(-1)).view_as(head)
            covered = (clusters[..., None] == top[:, None, :]).any(-1)
            absent = (members < 0) | (members == index[:, None])
            members = members.clamp_min(0)
            if kept is not None:
                absent |= ~kept[members]
            dropped = covered if dropped is None else dropped | covered
            head, dropped = torch.cat([head, members], 1), torch.cat([dropped, absent], 1)
        log_share = -math.log(others) if kept is None else -others.log()  # each head member's weight
        if dropped is None:
            head_logits = self._loc.new_full(head.shape, log_share)
            size = torch.full((b, 1), head.shape[1], device=index.device)
        else:  # a 2-hop head of 110 holds ~60 distinct members (77-95 at most in a batch of 100): score only those
            head, dropped = compact(head, dropped, index)
            head_logits = torch.where(dropped, -math.inf, log_share)
            size = (~dropped).sum(1, keepdim=True)
        in_tail = not_in(tail, torch.cat([index[:, None], head], 1), n)
        if near is None:
            log_tail = ((others - size) / others).log() - in_tail.sum(1, keepdim=True).clamp_min(1).log()
            tail_logits = torch.where(in_tail, log_tail.to(self._loc.dtype), -math.inf)
        else:
            z, pool_size, generator = near
            head, head_logits, tail_logits = draw_near(self._clusters, self.cluster_draws, z, generator, index, head,
                                                       head_logits, tail, in_tail, pool_size, log_share, kept)
        if self.variance == "shared":  # s broadcast, never indexed out of an (N, D) tensor: that backward costs
            shared = self._component_scale(self._scale[:1])  # an (N, D) scatter per step
            head_scale, tail_scale = shared.view(1, 1, -1), shared.expand(len(tail), -1)
        else:
            head_scale, tail_scale = rows(self._scale, head), self._scale[tail]
        # the weights as estimated (unnormalized): where no tail draw falls outside the head (a head that holds most
        # of a small pool) they sum to less than one, and normalizing them would inflate the head's share
        return HeadTailMixture(head_logits, self._collect(head, self._current(rows(self._loc, head))),
                               head_scale, tail_logits, self._collect(tail, self._current(self._loc[tail])),
                               tail_scale, self.max_elements, unnormalized=True)
