"""The scalable exemplar prior's machinery (``ExemplarPrior(path="scalable")``, ``models/exemplar_prior.py``):
the cache of encodings and how training steps write into it (``drift="affine"`` included), the neighbour table's
renewal and the clusters', the deferred gradient of the cached components (``gradient="deferred"``), the state a
checkpoint carries, and the all-gather that keeps every rank's cache and table equal under torch.distributed. The
per-step head/tail estimate itself is ``models/exemplar_head_tail.py``.

A mixin: it reads the prior's settings and state (``num_exemplars``, ``neighbors``, ``subset``, ``hops``, ``_loc``,
``_table``, ...), which ``ExemplarPrior.__init__`` sets; the class docstring there describes the estimate.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as torch_dist
from torch import nn

from vae_priors.models.exemplar_clusters import fit_clusters
from vae_priors.models.exemplar_head_tail import HeadTailEstimate
from vae_priors.models.neighbor_table import random_table, sweep

SWEEP_POOL = 256  # random candidates per chunk of a table sweep
SETTLED = 0.1  # a sweep that renews less than this share of the table's entries ends the renewal's sweeps
CLUSTER_ITERATIONS = 3  # Lloyd iterations per renewal, each started from the last renewal's centres


class ScalableEstimate(HeadTailEstimate):
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
