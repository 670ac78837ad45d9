"""The scalable exemplar prior's machinery (``ExemplarPrior(path="scalable")``, ``models/exemplar_prior.py``):
the cache of encodings and how training steps write into it (``drift="affine"`` included), the neighbour table's
renewal, the head/tail estimate of the leave-one-out mixture (with the search around z of ``landmarks`` and the
subset of ``keep``), the deferred gradient of the cached components (``gradient="deferred"``), the state a
checkpoint carries, and the all-gather that keeps every rank's cache and table equal under torch.distributed.

A mixin: it reads the prior's settings and state (``num_exemplars``, ``neighbors``, ``subset``, ``hops``, ``_loc``,
``_table``, ...), which ``ExemplarPrior.__init__`` sets; the class docstring there describes the estimate.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as torch_dist
from torch import nn

from vae_priors.models.exemplar_clusters import draw_near, fit_clusters
from vae_priors.models.mixture_distributions import HeadTailMixture, SearchedHeadTail
from vae_priors.models.neighbor_table import merge, not_in, random_table, rows, sweep

SWEEP_POOL = 256  # random candidates per chunk of a table sweep
SETTLED = 0.1  # a sweep that renews less than this share of the table's entries ends the renewal's sweeps
CLUSTER_ITERATIONS = 3  # Lloyd iterations per renewal, each started from the last renewal's centres


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


class ScalableEstimate:
    """The scalable path of ``ExemplarPrior``: cache, table and the per-step head/tail estimate."""

    def get_extra_state(self) -> dict:
        """What the scalable path holds beside the buffers, so that a resumed run continues bit for bit: the
        neighbour table, the sweep count (it seeds the sweeps' draws), and with current components the cache and
        the affine drift's anchor, map and recent pairs."""
        state = {"table": self._table, "sweeps": self._sweeps, "swept": self._swept, "seen": self._seen,
                 "due": self._due, "deferred": self._deferred, "centres": self._centres}
        if self.components == "current":
            state.update(loc=self._loc, scale=self._scale, anchor=self._anchor, map=self._map, pairs=self._pairs)
        return state

    def set_extra_state(self, state: dict | None) -> None:
        if state is None:  # a checkpoint from before the table was saved: the next step builds it again
            self._table = self._loc = None
            return
        clone = lambda t: None if t is None else t.clone()  # noqa: E731 (never shared with a saved state_dict)
        self._table, self._sweeps, self._swept = clone(state["table"]), state["sweeps"], state["swept"]
        self._seen, self._due, self._deferred = state["seen"], state["due"], clone(state.get("deferred"))
        if self._deferred is not None and torch_dist.is_available() and torch_dist.is_initialized() and (
                torch_dist.get_rank() > 0):  # a checkpoint holds rank 0's deferred gradients: counted once, there
            self._deferred.zero_()
        if self.components == "current":
            self._loc, self._scale = clone(state["loc"]), clone(state["scale"])
            self._anchor, self._map = clone(state["anchor"]), clone(state["map"])
            self._pairs = [(clone(i), clone(m)) for i, m in state["pairs"]]
        else:  # the cache is the component buffers, loaded before this
            self._loc, self._scale = (None, None) if self._table is None else self._components()
        self._centres, self._clusters = clone(state.get("centres")), None
        if self._loc is not None:
            self._sq_norm = self._loc.pow(2).sum(-1)
            self._fit_clusters(iterations=0)  # the saved centres' partition of the cache, as the run had it

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args) -> None:
        state_dict.setdefault(prefix + "_extra_state", None)  # load_state_dict passes its own copy
        super()._load_from_state_dict(state_dict, prefix, *args)

    def _remember_batch(self, module: nn.Module, args: tuple, output: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Forward hook on the guide's encoder: keep the encodings of the batch the guide has just seen."""
        if self.training and torch.is_grad_enabled() and args:
            self._batch = (args[0], output[0].detach(), output[1].detach())
            self._live = output[0] if self.gradient == "deferred" else None  # the guide's loc, in the graph

    @torch.no_grad()
    def _take_batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The guide's fresh (loc, scale) of this batch, when they are of these training points (else None)."""
        batch, self._batch = self._batch, None
        if batch is None or batch[0].shape[0] != index.shape[0] or not torch.equal(batch[0], self.train_x[index]):
            return None  # e.g. dynamically binarized inputs: not the stored exemplars
        return batch[1], batch[2]

    def _collect(self, ids: torch.Tensor, loc: torch.Tensor) -> torch.Tensor:
        """``gradient="deferred"``: cached means ``loc`` of exemplars ``ids`` as a leaf whose gradient (the loss's,
        which the cache does not pass to the encoder) is added to each exemplar's deferred gradient."""
        if self.gradient != "deferred" or not torch.is_grad_enabled():
            return loc
        if self._deferred is None or self._deferred.device != loc.device:
            self._deferred = torch.zeros(self.num_exemplars, loc.shape[-1], device=loc.device, dtype=loc.dtype)
        leaf = loc.detach().requires_grad_()

        def defer(grad: torch.Tensor) -> None:
            self._deferred.index_add_(0, ids.reshape(-1), grad.reshape(-1, grad.shape[-1]))

        leaf.register_hook(defer)
        return leaf

    def _pass_deferred(self, index: torch.Tensor, usable: bool) -> None:
        """Add the deferred gradients of the batch's exemplars to the gradient of the guide's encoding of them in
        this step (``usable``: that encoding is of these points), so that the encoder's backward pass carries them
        (no encoder pass of its own). Under torch.distributed every rank takes part, usable or not."""
        live, self._live = self._live, None
        if self._deferred is None:  # before the first step's estimate: nothing deferred yet, on any rank
            return
        usable = usable and live is not None and live.requires_grad
        if not (torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1):
            if usable:  # taken when the backward pass reaches the encoding: with what this step deferred before it
                live.register_hook(lambda grad: grad + self._take_deferred(index))
            return
        taken = self._take_deferred(index if usable else index[:0])  # a collective: here, on every rank
        if usable:
            live.register_hook(lambda grad: grad + taken)

    @torch.no_grad()
    def _take_deferred(self, index: torch.Tensor) -> torch.Tensor:
        """The deferred gradients of exemplars ``index``, taken out of the buffer. Each rank's buffer holds what its
        own steps deferred, so under torch.distributed the rows of every rank's batch are summed over the ranks and
        taken out of every buffer (the batches are disjoint), and each rank gets its own batch's sums."""
        if not (torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1):
            taken = self._deferred[index].clone()
            self._deferred[index] = 0
            return taken
        sizes = [torch.zeros(1, dtype=torch.long, device=index.device) for _ in range(torch_dist.get_world_size())]
        torch_dist.all_gather(sizes, torch.tensor([index.shape[0]], device=index.device))
        padded = index.new_full((int(max(sizes)),), -1)
        padded[: index.shape[0]] = index
        parts = [torch.empty_like(padded) for _ in sizes]
        torch_dist.all_gather(parts, padded)
        ids = torch.cat([part[: int(size)] for size, part in zip(sizes, parts, strict=True)])
        rows = self._deferred[ids]
        torch_dist.all_reduce(rows)
        self._deferred[ids] = 0
        start = int(sum(sizes[: torch_dist.get_rank()]))
        return rows[start : start + index.shape[0]]

    @torch.no_grad()
    def _store(self, index: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> None:
        """Write encodings into the cache (``drift="none"``: the cache holds means as they were when written)."""
        self._loc[index], self._scale[index] = loc, scale
        self._sq_norm[index] = loc.pow(2).sum(-1)

    @torch.no_grad()
    def _follow(self, index: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> None:
        """``drift="affine"``: refit the map anchor -> current on the last ``drift_batches`` batches' fresh means,
        and store this batch's means pulled back into the anchor frame (so the map carries them forward too).

        Least squares over the pairs (anchor mu_m, fresh mu_m): [mu_anchor, 1] @ W ~ mu_fresh, W of shape (D+1, D).
        """
        self._pairs = [*self._pairs, (index, loc)][-self.drift_batches :]
        ids, targets = torch.cat([p[0] for p in self._pairs]), torch.cat([p[1] for p in self._pairs])
        d = loc.shape[1]
        if ids.shape[0] <= d:  # fewer pairs than unknowns per dimension: keep the previous map
            return
        design = torch.cat([self._anchor[ids], torch.ones_like(targets[:, :1])], 1).double()
        fitted = torch.linalg.lstsq(design, targets.double()).solution  # (D+1, D)
        pulled, info = torch.linalg.solve_ex(fitted[:-1].T, (loc.double() - fitted[-1]).T)
        self._map = fitted.to(loc.dtype)
        if int(info) == 0:  # a singular map (never seen): the row keeps its older anchor-frame value
            self._store(index, pulled.T.to(loc.dtype), scale)

    def _current(self, loc: torch.Tensor) -> torch.Tensor:
        """Cached means in the current encoder's frame: as stored, or carried by the fitted affine map."""
        if self._map is None:
            return loc
        return loc @ self._map[:-1] + self._map[-1]

    @torch.no_grad()
    def _share_updates(self, index: torch.Tensor, fresh: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """All-gather every rank's fresh encodings and table rows, so that all ranks keep the same state."""
        d = self._loc.shape[1]
        nothing = self._loc.new_full((index.shape[0], d), math.nan)
        loc, scale = fresh if fresh is not None else (nothing, nothing)  # nan: nothing new; the table rows still are
        rows = torch.cat([index[:, None].double(), loc.double(), scale.double(), self._table[index].double()], 1)
        sizes = [torch.zeros(1, dtype=torch.long, device=rows.device) for _ in range(torch_dist.get_world_size())]
        torch_dist.all_gather(sizes, torch.tensor([rows.shape[0]], device=rows.device))
        padded = rows.new_zeros(int(max(sizes)), rows.shape[1])
        padded[: rows.shape[0]] = rows
        parts = [torch.empty_like(padded) for _ in sizes]
        torch_dist.all_gather(parts, padded)
        everything = torch.cat([part[: int(size)] for size, part in zip(sizes, parts, strict=True)])
        ids = everything[:, 0].long()
        self._table[ids] = everything[:, 1 + 2 * d :].long()
        known = ~everything[:, 1].isnan()
        if known.any():  # every rank absorbs the same rows in the same (rank) order
            loc, scale = (everything[known, a : a + d].to(self._loc.dtype) for a in (1, 1 + d))
            (self._store if self.drift == "none" else self._follow)(ids[known], loc, scale)

    @torch.no_grad()
    def refresh(self, loc: torch.Tensor | None = None, scale: torch.Tensor | None = None) -> None:
        """Renew the cache (re-encoding every exemplar unless ``loc``/``scale`` are given), then sweep the table."""
        x, n, k = self.train_x, self.num_exemplars, self.neighbors
        if self.components == "epoch":  # the cache is the components themselves, never written to
            loc, scale = self._components()
        elif loc is None:
            loc, scale = self._encode_all()
        self._loc, self._scale = (loc, scale) if self.components == "epoch" else (loc.clone(), scale.clone())
        self._sq_norm = self._loc.pow(2).sum(-1)
        if self.drift == "affine":  # a new frame: the map starts at the identity
            self._anchor, self._map, self._pairs = loc.clone(), None, []
        # the same draws on every rank (not the ranks' own Monte Carlo streams): their tables stay equal
        rng = torch.Generator(device=x.device).manual_seed(self._sweeps)
        self._sweeps += 1
        if self._table is None or self._table.device != x.device:
            self._table = random_table(n, k, x.device, rng)
        done, new = 0, math.inf
        while done < self.sweeps and new >= SETTLED:  # until the table settles: a young one needs several sweeps
            new, done = sweep(self._table, self._loc, SWEEP_POOL, rng), done + 1
        self._swept, self._seen = (done, new), 0
        self._fit_clusters(generator=rng)

    @torch.no_grad()
    def _fit_clusters(self, iterations: int = CLUSTER_ITERATIONS, generator: torch.Generator | None = None) -> None:
        """``clusters`` > 0: partition the cache by k-means, started from the last renewal's centres."""
        if not self.clusters or self._loc is None:
            return
        if self._centres is None and generator is None:  # nothing to start from (never with a saved state)
            return
        variance = self._component_scale(self._scale).pow(2)
        self._clusters = fit_clusters(self._loc, variance, self.clusters, generator, self._centres, iterations)
        self._centres = self._clusters.centres

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
        if not (self.landmarks or clustered or probing):
            return self._head_tail(index, head, tail, self.hops == 2, mask)
        landmarks = torch.randint(0, n, (self.landmarks,), device=index.device, generator=generator) if (
            self.landmarks) else None

        def build(z: torch.Tensor) -> HeadTailMixture:  # the head and tail of this z
            searched = head if landmarks is None else self._search(head, landmarks, z)
            probed = self._clusters.members_near(z.detach(), self.probe) if probing else None
            near = (z, len(pool), generator) if clustered else None
            return self._head_tail(index, searched, tail, self.hops == 2 or landmarks is not None, mask, near, probed)

        return SearchedHeadTail(build, lambda: self._head_tail(index, head, tail, self.hops == 2, mask),
                                index.shape[0], self._loc.shape[1])

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
                   probed: tuple[torch.Tensor, torch.Tensor] | None = None) -> HeadTailMixture:
        """The mixture of ``head`` (B, H) exactly and the sorted ``tail`` draws for the rest. ``distinct``: the
        head may repeat exemplars or hold n itself, so each is counted once and n dropped (a table row never does).
        ``kept``: an (N,) mask of the exemplars in the mixture (the tail draws only from them); None: all N.
        ``near`` (z, the pool's size, generator): the rest is also drawn around z from the clusters
        (``models/exemplar_clusters.py``), each draw weighed with the tail's by the balance heuristic. ``probed``
        (members (B, P) padded with -1, their clusters (B, t)): the head also holds every member of these clusters;
        head entries in them are dropped, since the members list them (no sort of the wider head)."""
        n, b = self.num_exemplars, index.shape[0]
        # the exemplars besides n that the mixture is over: N - 1, or |S| less n where n is in S
        others, dropped = n - 1, None
        if distinct:
            head = head.sort(1).values
            repeated = torch.cat([torch.zeros_like(head[:, :1], dtype=torch.bool), head[:, 1:] == head[:, :-1]], 1)
            dropped = repeated | (head == index[:, None])
        if kept is not None:
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
