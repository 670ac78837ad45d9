"""Priors that are mixtures of the guide's own posteriors: the VampPrior and the exemplar prior.

Both are p(z) = sum_k w_k q(z | u_k), with q(z|.) = N(mu(.), diag sigma(.)^2) the amortized guide's encoder
(``AmortizedNormalGuide.encode``), and both appear at the model's ``"z"`` site as a ``GaussianMixture`` (a
``MixtureSameFamily``), so the SVI loop, ``log_weights`` and ``evaluate`` need no special case.

* ``VampPrior`` (Tomczak & Welling 2018): u_k are K learnable pseudo-inputs.
* ``ExemplarPrior`` (Norouzi et al. 2020): u_n are the N training points. In training, the point being scored
  is left out (w_n = 1/(N-1) for the others); at evaluation all N components have w_n = 1/N. With the
  encoder's own variances it is the aggregated posterior q_agg(z) = 1/N sum_n q(z|x_n); with
  ``variance="shared"`` the components are N(mu(x_n), s^2 I) with one learned s, as in the Exemplar VAE.

Memory: the (queries x K) log-density matrix is built with the Gaussian quadratic expansion
sum_d (z_d - m_d)^2 / s_d^2 = (z^2) . (1/s^2) - 2 z . (m/s^2) + sum_d m_d^2/s_d^2 (two matrix products), in
chunks of at most ``max_elements`` entries; no queries x K x latent tensor is ever formed. The expansion loses
float32 precision when |z|, |m| >> s (about eps * m^2/s^2 nats); tests bound it against float64.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from torch import nn
from torch.nn import functional as F

DEFAULT_MAX_ELEMENTS = 2**22  # entries of one (queries x components) chunk: 16 MB of float32


def gaussian_log_density_matrix(z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """log N(z_q; loc_k, diag scale_k^2) for every query q (Q, D) and component k (K, D): shape (Q, K)."""
    dtype = torch.promote_types(z.dtype, loc.dtype)  # float64 queries (diagnostics) against float32 encodings
    z, loc, scale = z.to(dtype), loc.to(dtype), scale.to(dtype)
    precision = scale.pow(-2)
    quad = (z * z) @ precision.T - 2.0 * z @ (loc * precision).T + (loc * loc * precision).sum(-1)
    log_norm = scale.log().sum(-1) + 0.5 * loc.shape[-1] * math.log(2 * math.pi)
    return -0.5 * quad.clamp_min(0.0) - log_norm


class GaussianMixture(dist.MixtureSameFamily):
    """sum_k softmax(logits_b)_k N(z; loc_k, diag scale_k^2): K diagonal Gaussians shared by the whole batch,
    with per-point mixture logits (batch shape (B,), event shape (D,)).

    :param logits: (B, K) mixture logits; -inf drops a component for that point (leave-one-out).
    :param loc: (K, D) component means; ``scale``: (K, D) standard deviations (may be an expanded view).
    ``log_prob`` works in chunks of ``max_elements`` (queries x K) entries; ``sample`` gathers one component per
    draw instead of sampling all K (torch's ``MixtureSameFamily.sample`` would).
    """

    def __init__(self, logits: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor,
                 max_elements: int = DEFAULT_MAX_ELEMENTS, validate_args: bool | None = None):
        if logits.dim() != 2 or loc.dim() != 2 or logits.shape[-1] != loc.shape[0] or scale.shape != loc.shape:
            raise ValueError(f"GaussianMixture needs logits (B, K), loc and scale (K, D); got {tuple(logits.shape)}, "
                             f"{tuple(loc.shape)}, {tuple(scale.shape)}")
        self.loc, self.scale, self.max_elements = loc, scale, max_elements
        self.point_logits = logits  # (B, K): varies along the last batch dim only
        batch = logits.shape[:1] + loc.shape[:1]
        # validate_args=False: a check of the expanded (B, K, D) view would materialize it
        components = dist.Normal(loc.expand(batch + loc.shape[1:]), scale.expand(batch + loc.shape[1:]),
                                 validate_args=False).to_event(1)
        super().__init__(dist.Categorical(logits=logits), components, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(GaussianMixture, _instance)
        new.loc, new.scale, new.max_elements = self.loc, self.scale, self.max_elements
        new.point_logits = self.point_logits
        return super().expand(batch_shape, _instance=new)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        shape = torch.broadcast_shapes(value.shape[:-1], self.batch_shape)
        queries = value.expand(shape + value.shape[-1:]).reshape(-1, value.shape[-1])
        num_points, num_components = self.point_logits.shape
        if shape[-1] != num_points and num_points != 1:
            raise ValueError(f"value of shape {tuple(value.shape)} does not end with the batch size {num_points}")
        log_w = self.point_logits - self.point_logits.logsumexp(-1, keepdim=True)
        step = max(1, self.max_elements // num_components)
        out = []
        for start in range(0, queries.shape[0], step):
            rows = torch.arange(start, min(start + step, queries.shape[0]), device=queries.device)
            dens = gaussian_log_density_matrix(queries[rows], self.loc, self.scale)
            out.append((dens + log_w[rows % num_points]).logsumexp(-1))  # last batch dim varies fastest
        return torch.cat(out).reshape(shape)

    def sample(self, sample_shape: tuple[int, ...] = ()) -> torch.Tensor:
        with torch.no_grad():
            k = self.mixture_distribution.sample(torch.Size(sample_shape))
            return torch.normal(self.loc[k], self.scale[k])


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

    For data in [0, 1] (``bounded=True``) u_k = sigmoid(a_k), so pseudo-inputs stay in the data's range;
    a_k starts at logit(clip(x_k, 0.01, 0.99)) for K random training points x_k. Unbounded data: u_k = a_k.
    Weights are uniform, or softmax of learned logits with ``learn_weights``. The index is not used.
    """

    def __init__(self, guide: nn.Module, init_points: torch.Tensor, bounded: bool = True,
                 learn_weights: bool = False, max_elements: int = DEFAULT_MAX_ELEMENTS):
        super().__init__(guide, max_elements)
        self.bounded = bounded
        raw = torch.logit(init_points.clamp(0.01, 0.99)) if bounded else init_points.clone()
        self.raw_pseudo_inputs = nn.Parameter(raw)
        logits = torch.zeros(init_points.shape[0])
        self.logits = nn.Parameter(logits) if learn_weights else nn.Buffer(logits)

    @property
    def pseudo_inputs(self) -> torch.Tensor:
        return torch.sigmoid(self.raw_pseudo_inputs) if self.bounded else self.raw_pseudo_inputs

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
       between cached means), refined at every visit and at every refresh by one NN-descent step over
       {current neighbours, their neighbours, a random subset S} (Dong et al. 2011);
    3. the step's mixture for point n is  sum_{m in head_n} 1/(N-1) r_m(z)
       + (N-1-k)/(N-1) * 1/|S_n| sum_{m in S_n} r_m(z),  with S_n = S minus head_n and n, a uniform random
       subset of size ~M standing for the other N-1-k exemplars. Its weights sum to 1; given the cache it is
       an unbiased estimate of the leave-one-out mixture density p(z) (biased low in log space).

    Approximations: cached components are up to one refresh period stale; gradients reach the encoder
    through z and the shared scale but not through the cached exemplars; the head holds approximate
    neighbours. ``experiments/benchmarks/mixture_prior_bench.py`` measures the resulting error in nats per
    point against the exact leave-one-out log-density. Per step it costs O(B (k^2 + M) D), independent of N.
    """

    def __init__(self, guide: nn.Module, train_x: torch.Tensor, variance: str = "encoder", path: str = "exact",
                 neighbors: int = 10, subset: int = 1024, refresh_points: int = 0,
                 max_elements: int = DEFAULT_MAX_ELEMENTS):
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
        self.neighbors, self.subset = neighbors, subset
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
        if self._table is None or self._table.device != x.device:
            # k distinct neighbours other than the point itself: n + 1 + ((r_n + j) mod (N-1)) mod N
            offset = torch.randint(0, n - 1, (n, 1), device=x.device) + torch.arange(k, device=x.device)
            self._table = (torch.arange(n, device=x.device)[:, None] + 1 + offset % (n - 1)) % n
        for chunk in torch.arange(n, device=x.device).split(1024):
            self._update_neighbors(chunk, torch.randperm(n, device=x.device)[: self.subset])
        self._seen = 0

    @torch.no_grad()
    def _update_neighbors(self, index: torch.Tensor, subset: torch.Tensor) -> None:
        """One NN-descent step for the points ``index``: keep the k nearest of neighbours, their neighbours, S."""
        k, mine = self.neighbors, self._table[index]
        local = torch.cat([mine, self._table[mine].flatten(1)], dim=1)  # (B, k + k^2)
        query, loc_s = self._loc[index], self._loc[subset]
        d2_local = (query[:, None, :] - self._loc[local]).pow(2).sum(-1)
        d2_subset = (query * query).sum(-1, keepdim=True) - 2 * query @ loc_s.T + (loc_s * loc_s).sum(-1)
        pool = torch.cat([local, subset.expand(index.shape[0], -1)], dim=1)
        d2 = torch.cat([d2_local, d2_subset], dim=1).masked_fill(pool == index[:, None], math.inf)
        ids, order = pool.sort(dim=1)
        d2 = d2.gather(1, order)
        d2[:, 1:].masked_fill_(ids[:, 1:] == ids[:, :-1], math.inf)  # each exemplar counted once
        self._table[index] = ids.gather(1, d2.topk(k, dim=1, largest=False).indices)

    def _scalable_mixture(self, index: torch.Tensor) -> GaussianMixture:
        n, k, b = self.num_exemplars, self.neighbors, index.shape[0]
        if self._loc is None or self._seen >= self.refresh_points or self._loc.device != self.train_x.device:
            self.refresh()
        self._seen += b
        subset = torch.randperm(n, device=index.device)[: self.subset]
        self._update_neighbors(index, subset)
        head = self._table[index]  # (B, k)
        in_tail = (subset != index[:, None]) & ~(subset[None, :, None] == head[:, None, :]).any(-1)  # (B, M)
        components, inverse = torch.unique(torch.cat([head.flatten(), subset]), return_inverse=True)
        log_tail = math.log((n - 1 - k) / (n - 1)) - in_tail.sum(1, keepdim=True).log()
        logits = torch.full((b, components.shape[0]), -math.inf, device=index.device)
        logits[:, inverse[head.numel():]] = torch.where(in_tail, log_tail, -math.inf)
        logits.scatter_(1, inverse[: head.numel()].view(b, k), -math.log(n - 1))
        return GaussianMixture(logits, self._loc[components], self._component_scale(self._scale[components]),
                               self.max_elements)
