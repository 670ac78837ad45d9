"""Priors that are mixtures of the guide's own posteriors: the VampPrior and the exemplar prior.

Both are p(z) = sum_k w_k q(z | u_k), with q(z|.) = N(mu(.), diag sigma(.)^2) the amortized guide's encoder
(``AmortizedNormalGuide.encode``), and both appear at the model's ``"z"`` site as a ``GaussianMixture`` (a
``MixtureSameFamily``), so the SVI loop, ``log_weights`` and ``evaluate`` need no special case.

* ``VampPrior`` (Tomczak & Welling 2018): u_k are K learnable pseudo-inputs.
* ``ExemplarPrior`` (Norouzi et al. 2020): u_n are the N training points. In training, the point being scored
  is left out (w_n = 1/(N-1) for the others); at evaluation all N components have w_n = 1/N. With the
  encoder's own variances it is the aggregated posterior q_agg(z) = 1/N sum_n q(z|x_n); with
  ``variance="shared"`` the components are N(mu(x_n), s^2 I) with one learned s, as in the Exemplar VAE.

Memory: the mixtures (``models/mixture_distributions.py``) evaluate their log-density in bounded chunks; no
queries x K x latent tensor is ever formed.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from vae_priors.models.mixture_distributions import DEFAULT_MAX_ELEMENTS, GaussianMixture, HeadTailMixture


class _MixtureOfPosteriors(nn.Module):
    """Common part: the guide's encoder (shared, not copied) and encodings cached by parameter version."""

    def __init__(self, guide: nn.Module, max_elements: int):
        super().__init__()
        if not hasattr(guide, "encode"):
            raise TypeError(f"{type(guide).__name__} has no encode(x); a mixture prior needs an amortized guide "
                            "such as AmortizedNormalGuide")
        self.guide = guide
        self.max_elements = max_elements
        self._cache_key, self._cache = None, None

    def _encode(self, x: torch.Tensor, source: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
        """(loc, scale) of q(z|x) for the rows of ``x``, which is computed from the stored tensor ``source``."""
        if torch.is_grad_enabled():
            posterior = self.guide.encode(x).base_dist
            return posterior.loc, posterior.scale
        # Without gradients (evaluation), reuse the encodings until a parameter or the input changes
        # (optimizer steps and load_state_dict bump tensor versions).
        key = tuple((t.data_ptr(), t._version) for t in (*self.guide.parameters(), source))
        if key != self._cache_key:
            parts = [self.guide.encode(x[i : i + chunk]).base_dist for i in range(0, x.shape[0], chunk)]
            self._cache = torch.cat([p.loc for p in parts]), torch.cat([p.scale for p in parts])
            self._cache_key = key
        return self._cache


class VampPrior(_MixtureOfPosteriors):
    """p(z) = sum_k w_k q(z | u_k) over K learnable pseudo-inputs u_k (Tomczak & Welling 2018, eq. 9).

    For data in [0, 1] (``bounded=True``) the pseudo-inputs stay in the data's range through ``link``:

    * ``"sigmoid"``: u_k = sigmoid(a_k), a_k starting at logit(clip(x_k, 0.01, 0.99)) for the ``init_points``
      (K random training points, say);
    * ``"hardtanh"`` (the reference code's): u_k = Hardtanh(0, 1)(a_k), a_k starting at ``init_points`` as given
      (there: N(0.05, 0.01^2) noise, ``reference_init``).

    Unbounded data: u_k = a_k. Weights are uniform, or softmax of learned logits with ``learn_weights``.
    The index is not used.
    """

    def __init__(self, guide: nn.Module, init_points: torch.Tensor, bounded: bool = True,
                 learn_weights: bool = False, max_elements: int = DEFAULT_MAX_ELEMENTS, link: str = "sigmoid"):
        super().__init__(guide, max_elements)
        if link not in ("sigmoid", "hardtanh"):
            raise ValueError(f"pseudo-input link {link!r} is unknown; choose \"sigmoid\" or \"hardtanh\"")
        self.bounded, self.link = bounded, link
        sigmoid = bounded and link == "sigmoid"
        raw = torch.logit(init_points.clamp(0.01, 0.99)) if sigmoid else init_points.clone()
        self.raw_pseudo_inputs = nn.Parameter(raw)
        logits = torch.zeros(init_points.shape[0])
        self.logits = nn.Parameter(logits) if learn_weights else nn.Buffer(logits)

    @staticmethod
    def reference_init(num: int, dim: int, mean: float = 0.05, std: float = 0.01) -> torch.Tensor:
        """The reference code's starting pseudo-inputs for binary MNIST: (num, dim) draws from N(mean, std^2)."""
        return mean + std * torch.randn(num, dim)

    @property
    def pseudo_inputs(self) -> torch.Tensor:
        if not self.bounded:
            return self.raw_pseudo_inputs
        if self.link == "hardtanh":
            return F.hardtanh(self.raw_pseudo_inputs, 0.0, 1.0)
        return torch.sigmoid(self.raw_pseudo_inputs)

    def forward(self, index: torch.Tensor) -> GaussianMixture:
        loc, scale = self._encode(self.pseudo_inputs, self.raw_pseudo_inputs)
        return GaussianMixture(self.logits.expand(index.shape[0], -1), loc, scale, self.max_elements)


class ExemplarPrior(_MixtureOfPosteriors):
    """Exemplar prior over the N training points (Norouzi et al. 2020, eq. 4), leave-one-out in training.

    p(z | not n) = 1/(N-1) sum_{m != n} r(z | x_m) when training point n is scored (``index`` = the minibatch's
    training indices, module in training mode); p(z) = 1/N sum_m r(z | x_m) in eval mode. r(z|x_m) is the
    guide's q(z|x_m) (``variance="encoder"``: the mixture is the aggregated posterior) or N(mu(x_m), s^2 I)
    with one learned s (``variance="shared"``, the Exemplar VAE's choice).

    ``path="exact"`` encodes all N exemplars with gradients at every step (cost O(N) encoder passes: for
    small N such as the digits). ``path="scalable"`` (for MNIST-size N) is a stratified estimate:

    1. cache: (mu_m, sigma_m) of all exemplars, computed without gradients and refreshed after every
       ``refresh_points`` scored points (default N: once per epoch);
    2. head: for each training point n a table of its k nearest exemplars in the cache (Euclidean distance
       between cached means), refined at every refresh by one NN-descent step over {current neighbours,
       their neighbours, the k nearest of a random subset} (Dong et al. 2011), and after every visit by
       merging in the k nearest of that step's tail draws (for later visits; the step itself uses the old head);
    3. the step's mixture for point n (a ``HeadTailMixture``) is  sum_{m in head_n} 1/(N-1) r_m(z)
       + (N-1-k)/(N-1) * 1/|S_n| sum_{m in S_n} r_m(z),  with S = M i.i.d. uniform draws from 1..N shared by
       the batch and S_n = the draws not equal to n nor in head_n: given |S_n|, those are i.i.d. uniform over
       the other N-1-k exemplars, so the tail mean is unbiased for theirs. Its weights sum to 1; given the
       cache it is an unbiased estimate of the leave-one-out mixture density (biased low in log space).
       With M >= N the tail is all N exemplars instead, and the mixture is exact given the cache.

    Approximations: cached components are up to one refresh period stale; gradients reach the encoder
    through z and the shared scale but not through the cached exemplars; the head holds approximate
    neighbours. ``experiments/benchmarks/mixture_prior_bench.py`` measures the resulting error in nats per
    point against the exact leave-one-out log-density, right after a refresh and 100 steps past one. Per step it
    costs O(B (k + M) D), independent of N; a refresh costs N encoder passes and O(N (k^2 + M) D).
    """

    def __init__(self, guide: nn.Module, train_x: torch.Tensor, variance: str = "encoder", path: str = "exact",
                 neighbors: int = 10, subset: int = 512, refresh_points: int = 0,
                 max_elements: int = DEFAULT_MAX_ELEMENTS, refine: bool = True):
        super().__init__(guide, max_elements)
        n = train_x.shape[0]
        if variance not in ("encoder", "shared"):
            raise ValueError(f"exemplar variance {variance!r} is unknown; choose \"encoder\" or \"shared\"")
        if path not in ("exact", "scalable"):
            raise ValueError(f"exemplar path {path!r} is unknown; choose \"exact\" or \"scalable\"")
        if n < 2:
            raise ValueError(f"an exemplar prior needs at least 2 training points for leave-one-out, got {n}")
        if path == "scalable" and not (1 <= neighbors and neighbors + 2 <= subset <= n):
            raise ValueError(f"the scalable exemplar path needs 1 <= neighbors and neighbors + 2 <= subset <= N; got "
                             f"neighbors={neighbors}, subset={subset}, N={n}: lower them or use path=\"exact\"")
        self.variance, self.path = variance, path
        self.neighbors, self.subset, self.refine = neighbors, subset, refine
        self.refresh_points = refresh_points or n
        self.register_buffer("train_x", train_x, persistent=False)  # rebuilt from the data, not checkpointed
        if variance == "shared":
            self.raw_shared_scale = nn.Parameter(torch.tensor(math.log(math.e - 1.0)))  # softplus^-1(1)
        self._loc = self._scale = self._table = None
        self._seen = 0

    @property
    def num_exemplars(self) -> int:
        return self.train_x.shape[0]

    def _component_scale(self, scale: torch.Tensor) -> torch.Tensor:
        if self.variance == "encoder":
            return scale
        return (F.softplus(self.raw_shared_scale) + 1e-3).expand(scale.shape)

    def mixture(self, index: torch.Tensor | None = None) -> GaussianMixture:
        """The exact mixture from the current encoder: leave-one-out for training indices ``index``, else all N."""
        loc, scale = self._encode(self.train_x, self.train_x)
        n = self.num_exemplars
        if index is None:
            return GaussianMixture(loc.new_zeros(1, n), loc, self._component_scale(scale), self.max_elements)
        logits = loc.new_zeros(index.shape[0], n)
        logits[torch.arange(index.shape[0], device=index.device), index] = -math.inf
        return GaussianMixture(logits, loc, self._component_scale(scale), self.max_elements)

    def forward(self, index: torch.Tensor) -> GaussianMixture:
        if not self.training:
            return self.mixture().expand(index.shape[:1])
        if index.numel() and int(index.max()) >= self.num_exemplars:
            raise ValueError(f"in training mode the exemplar prior scores training points (indices < "
                             f"{self.num_exemplars}), got index {int(index.max())}; call .eval() for other points")
        return self.mixture(index) if self.path == "exact" else self._scalable_mixture(index)

    @torch.no_grad()
    def refresh(self) -> None:
        """Re-encode every exemplar into the cache and run one neighbour-table sweep over all points."""
        x, n, k = self.train_x, self.num_exemplars, self.neighbors
        parts = [self.guide.encode(x[i : i + 4096]).base_dist for i in range(0, n, 4096)]
        self._loc, self._scale = torch.cat([p.loc for p in parts]), torch.cat([p.scale for p in parts])
        self._sq_norm = self._loc.pow(2).sum(-1)
        if self._table is None or self._table.device != x.device:
            # k distinct neighbours other than the point itself: n + 1 + ((r_n + j) mod (N-1)) mod N
            offset = torch.randint(0, n - 1, (n, 1), device=x.device) + torch.arange(k, device=x.device)
            self._table = (torch.arange(n, device=x.device)[:, None] + 1 + offset % (n - 1)) % n
        for chunk in torch.arange(n, device=x.device).split(1024):
            self._update_neighbors(chunk, torch.randint(0, n, (self.subset,), device=x.device))
        self._seen = 0

    @torch.no_grad()
    def _update_neighbors(self, index: torch.Tensor, subset: torch.Tensor) -> None:
        """One NN-descent step for the points ``index``: keep the k nearest of their neighbours, the neighbours'
        neighbours and the k nearest of the random exemplars ``subset``."""
        mine = self._table[index]
        local = torch.cat([mine, self._table[mine].flatten(1)], dim=1)  # (B, k + k^2)
        near = self._squared_distances(index, subset).topk(self.neighbors, dim=1, largest=False)
        self._keep_nearest(index, torch.cat([local, subset[near.indices]], 1),
                           torch.cat([self._squared_distances(index, local), near.values], 1))

    def _squared_distances(self, index: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """|mu_n - mu_m|^2 between cached means by the quadratic expansion: (B, M) for ``other`` (M,) shared by the
        batch, (B, L) for ``other`` (B, L) per point."""
        query = self._loc[index]
        if other.dim() == 1:
            cross = query @ self._loc[other].T
        else:
            cross = torch.bmm(self._loc[other], query[:, :, None]).squeeze(-1)
        return self._sq_norm[index][:, None] - 2 * cross + self._sq_norm[other]

    def _keep_nearest(self, index: torch.Tensor, pool: torch.Tensor, d2: torch.Tensor) -> None:
        """Set each point's table row to the k nearest distinct exemplars (other than itself) in ``pool``."""
        d2 = d2.masked_fill(pool == index[:, None], math.inf)
        ids, order = pool.sort(dim=1)
        d2 = d2.gather(1, order)
        d2[:, 1:].masked_fill_(ids[:, 1:] == ids[:, :-1], math.inf)  # each exemplar counted once
        self._table[index] = ids.gather(1, d2.topk(self.neighbors, dim=1, largest=False).indices)

    def _scalable_mixture(self, index: torch.Tensor) -> HeadTailMixture:
        n, k, b = self.num_exemplars, self.neighbors, index.shape[0]
        if self._loc is None or self._seen >= self.refresh_points or self._loc.device != self.train_x.device:
            self.refresh()
        self._seen += b
        # tail: M i.i.d. uniform draws; those equal to n or in head_n are dropped, so the kept ones are i.i.d.
        # uniform over the other N-1-k exemplars and their mean is unbiased for the tail's mean density
        if self.subset >= n:
            tail = torch.arange(n, device=index.device)  # every exemplar: exact given the cache
        else:
            tail = torch.randint(0, n, (self.subset,), device=index.device)
        head = self._table[index]  # (B, k), fixed before this step's draws
        tail = tail.sort().values
        in_tail = self._not_in(tail, torch.cat([index[:, None], head], 1))
        log_tail = math.log((n - 1 - k) / (n - 1)) - in_tail.sum(1, keepdim=True).clamp_min(1).log()
        tail_logits = torch.where(in_tail, log_tail, -math.inf)
        if self.refine and self.subset < n:
            self._refine_neighbors(index, head, tail)
        scale = self._component_scale(self._scale)
        return HeadTailMixture(self._loc.new_full((b, k), -math.log(n - 1)), self._loc[head], scale[head],
                               tail_logits, self._loc[tail], scale[tail], self.max_elements)

    @staticmethod
    def _not_in(sorted_ids: torch.Tensor, excluded: torch.Tensor) -> torch.Tensor:
        """(B, M) mask: sorted_ids[m] not in excluded[b] (B, E), via the ranges of equal ids found by bisection."""
        bounds = torch.stack([torch.searchsorted(sorted_ids, excluded, right=r) for r in (False, True)])  # (2, B, E)
        steps = torch.zeros(excluded.shape[0], sorted_ids.shape[0] + 1, dtype=torch.int32, device=excluded.device)
        steps.scatter_add_(1, bounds[0], torch.ones_like(bounds[0], dtype=torch.int32))  # +1 where a range opens,
        steps.scatter_add_(1, bounds[1], torch.full_like(bounds[1], -1, dtype=torch.int32))  # -1 where it closes
        return steps.cumsum(1)[:, :-1] == 0

    @torch.no_grad()
    def _refine_neighbors(self, index: torch.Tensor, head: torch.Tensor, tail: torch.Tensor) -> None:
        """Cheap per-visit refinement: merge head_n with the k tail draws nearest to mu_n (for later visits)."""
        near = self._squared_distances(index, tail).topk(self.neighbors, dim=1, largest=False)
        self._keep_nearest(index, torch.cat([head, tail[near.indices]], 1),
                           torch.cat([self._squared_distances(index, head), near.values], 1))
