"""Gaussian mixtures whose K diagonal components are shared by a batch of points, each point with its own weights.

``GaussianMixture`` is the distribution a mixture prior over training points puts at the model's ``"z"`` site
(``models/mixture_priors.py``); ``HeadTailMixture`` is the scalable exemplar prior's per-step estimate of one.
Both are ``MixtureSameFamily`` subclasses whose ``log_prob`` never forms a points x K x latent tensor: the
(points x K) log-density matrix comes from the Gaussian quadratic expansion
sum_d (z_d - m_d)^2 / s_d^2 = (z^2) . (1/s^2) - 2 z . (m/s^2) + sum_d m_d^2/s_d^2 (one matrix product,
``LinearForm``), in chunks of at most ``max_elements`` entries. The expansion loses float32 precision when
|z|, |m| >> s (about eps * m^2/s^2 nats); the tests bound it against float64.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch

DEFAULT_MAX_ELEMENTS = 2**20  # entries of one (queries x components) chunk: 4 MB of float32, which stays in
# the CPU's cache through the chunk's passes (twice as fast as 16 MB on 10 000 x 50 000, BENCHMARKS.md section 2)
COMPONENT_BLOCK = 4096  # components per block of GaussianMixture.log_prob


def logsumexp_rows(matrix: torch.Tensor, overwrite: bool = False) -> torch.Tensor:
    """``matrix.logsumexp(-1)``, about 10x faster where the rows span hundreds of nats (a mixture over thousands of
    components far from the query): the CPU's exp is slow below about -87, so differences to the row's maximum are
    clamped at -80 first. A clamped term adds at most e^-80 of the maximum's weight (1e-35, below float precision
    even summed over 10^9 components); a row with no finite entry stays -inf. ``overwrite``: the caller's
    temporary ``matrix`` may be used as scratch space when no gradient flows through it (evaluation, validation),
    which halves the time: each out-of-place pass over a block of millions of entries would allocate it anew."""
    top = matrix.detach().amax(-1, keepdim=True)
    finite = torch.isfinite(top)
    top = torch.where(finite, top, torch.zeros_like(top))
    if overwrite and not (torch.is_grad_enabled() and matrix.requires_grad):
        total = matrix.sub_(top).clamp_min_(-80.0).exp_().sum(-1, keepdim=True).log_() + top
    else:
        total = (matrix - top).clamp_min(-80.0).exp().sum(-1, keepdim=True).log() + top
    return torch.where(finite, total, torch.full_like(total, -math.inf)).squeeze(-1)


class LinearForm:
    """log N(z; loc_k, diag scale_k^2) for K components as one matrix product per chunk of queries:
    ``matrix(features(z))`` = features @ weight + bias ((Q, K)) plus a row term ((Q,)), the quadratic expansion
    sum_d (z_d - m_d)^2 / s_d^2 = (z^2) . (1/s^2) - 2 z . (m/s^2) + sum_d m_d^2/s_d^2.

    With one scale shared by every component and dimension (the exemplar prior's ``variance="shared"``, an
    expanded scalar) the z^2 term leaves the matrix: features are z alone, half the product. ``extra`` (K,) is
    added to the bias (mixture log-weights shared by every query), so a chunk costs one ``addmm`` and a
    ``logsumexp``.
    """

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, extra: torch.Tensor | None = None):
        loc, d = loc.to(dtype), loc.shape[-1]
        self.isotropic = scale.dim() == 2 and scale.stride() == (0, 0)
        if self.isotropic:
            s = scale[0, 0].to(dtype)
            self.inv_var = s.pow(-2)
            self.weight = (loc * self.inv_var).T
            bias = -0.5 * loc.pow(2).sum(-1) * self.inv_var - d * (s.log() + 0.5 * math.log(2 * math.pi))
        else:
            precision = scale.to(dtype).pow(-2)
            self.weight = torch.cat([-0.5 * precision, loc * precision], -1).T
            bias = (-0.5 * (loc * loc * precision).sum(-1) - scale.to(dtype).log().sum(-1)
                    - 0.5 * d * math.log(2 * math.pi))
        self.bias = bias if extra is None else bias + extra.to(dtype)
        self.dtype = dtype

    def features(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the queries' features, (Q,) row term) of ``z`` (Q, D), for ``matrix``."""
        z = z.to(self.dtype)
        if self.isotropic:
            return z, -0.5 * z.pow(2).sum(-1) * self.inv_var
        return torch.cat([z * z, z], -1), z.new_zeros(z.shape[0])

    def matrix(self, features: torch.Tensor, components: slice = slice(None)) -> torch.Tensor:
        """(Q, K') log-densities of the ``components`` up to the row term: one ``addmm``."""
        return torch.addmm(self.bias[components], features, self.weight[:, components])


def gaussian_log_density_matrix(z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """log N(z_q; loc_k, diag scale_k^2) for every query q (Q, D) and component k (K, D): shape (Q, K)."""
    dtype = torch.promote_types(z.dtype, loc.dtype)  # float64 queries (diagnostics) against float32 encodings
    form = LinearForm(loc, scale, dtype)
    features, row = form.features(z)
    return form.matrix(features) + row[:, None]


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
        if logits.shape[0] > 1 and logits.stride(0) == 0:  # one row for the whole batch (an expanded view):
            # Categorical normalizes its logits, which would copy B x K numbers (50 000^2 for the exemplar prior)
            mixing = dist.Categorical(logits=logits[:1]).expand(logits.shape[:1])
        else:
            mixing = dist.Categorical(logits=logits)
        super().__init__(mixing, components, validate_args=validate_args)

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
        shared = num_points == 1 or self.point_logits.stride(0) == 0  # one row of weights: into the bias
        logits = self.point_logits[:1] if shared else self.point_logits  # an expanded row is normalized once
        log_w = logits - logits.logsumexp(-1, keepdim=True)
        dtype = torch.promote_types(queries.dtype, self.loc.dtype)
        form = LinearForm(self.loc, self.scale, dtype, log_w[0] if shared else None)
        # blocks of queries x components (about 1024 x 4096 by default): a tall, thin product over all K at once
        # runs at half the speed; the per-block logsumexps are combined exactly with logaddexp
        width = min(num_components, COMPONENT_BLOCK)
        step = max(1, self.max_elements // width)
        out = []
        for start in range(0, queries.shape[0], step):
            rows = torch.arange(start, min(start + step, queries.shape[0]), device=queries.device)
            features, row = form.features(queries[rows])
            total = None
            for first in range(0, num_components, width):
                block = slice(first, first + width)
                matrix = form.matrix(features, block)
                if not shared:
                    matrix = matrix + log_w[rows % num_points, block]  # last batch dim varies fastest
                part = logsumexp_rows(matrix, overwrite=True)  # a temporary of this loop
                total = part if total is None else torch.logaddexp(total, part)
            out.append(total + row)
        return torch.cat(out).reshape(shape)

    def sample(self, sample_shape: tuple[int, ...] = ()) -> torch.Tensor:
        with torch.no_grad():
            k = self.mixture_distribution.sample(torch.Size(sample_shape))
            return torch.normal(self.loc[k], self.scale[k])


class _SquaredDistances(torch.autograd.Function):
    """|z_sb - loc_bk|^2 ((S, B, k)) for queries z (S, B, D) and per-point components loc (B, k, D), by the
    expansion |z|^2 - 2 z.loc + |loc|^2: one batched product forward and two backward, where autograd through
    the expansion spends three passes over the (B, k, D) tensor on the squares and their sums."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, loc: torch.Tensor) -> torch.Tensor:
        zb = z.transpose(0, 1)  # (B, S, D)
        ctx.save_for_backward(zb, loc)
        cross = torch.baddbmm(loc.pow(2).sum(-1)[:, None, :], zb, loc.transpose(1, 2), alpha=-2)  # (B, S, k)
        return (cross + zb.pow(2).sum(-1, keepdim=True)).transpose(0, 1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        zb, loc = ctx.saved_tensors
        g = grad.transpose(0, 1)  # (B, S, k)
        grad_z = grad_loc = None
        if ctx.needs_input_grad[0]:  # d/dz = 2 sum_k g (z - loc_k)
            grad_z = (2 * (zb * g.sum(-1, keepdim=True) - torch.bmm(g, loc))).transpose(0, 1)
        if ctx.needs_input_grad[1] and zb.shape[1] == 1:  # d/dloc_k = 2 sum_s g (loc_k - z_s): two passes
            grad_loc = (loc - zb).mul_(2 * g.transpose(1, 2))
        elif ctx.needs_input_grad[1]:
            grad_loc = 2 * (loc * g.sum(1)[..., None] - torch.bmm(g.transpose(1, 2), zb))
        return grad_z, grad_loc


class HeadTailMixture(dist.MixtureSameFamily):
    """Per-point mixture of k local components and M components shared by the batch (event shape (D,)):
    sum_j softmax(l_b)_j N(z; head_loc_bj, diag head_scale_bj^2) + sum_m softmax(l_b)_{k+m} N(z; tail_loc_m, ...),
    with l_b = [head_logits_b, tail_logits_b] ((B, k) and (B, M); -inf drops a component for that point).
    ``head_scale`` is (B, k, D), or (1, 1, D) when the whole head shares one scale (then never expanded).

    ``log_prob`` evaluates the head directly ((B, k, D)) and the tail by the quadratic expansion of
    ``gaussian_log_density_matrix`` in chunks of ``max_elements`` (queries x M) entries, so no (B, k + M, D)
    tensor is formed; ``component_distribution`` (for ``mean``, ``sample``) builds it only when asked.

    ``unnormalized=True``: the logits are an importance-sampled estimate's log-weights, which sum to one only on
    average; ``log_prob`` keeps their sum (``log_mass``, (B,)), so the density stays the estimate's, where the
    mixture's own weights would be normalized. ``sample`` draws from the normalized mixture.
    """

    def __init__(self, head_logits: torch.Tensor, head_loc: torch.Tensor, head_scale: torch.Tensor,
                 tail_logits: torch.Tensor, tail_loc: torch.Tensor, tail_scale: torch.Tensor,
                 max_elements: int = DEFAULT_MAX_ELEMENTS, validate_args: bool | None = None,
                 unnormalized: bool = False):
        b, k, d = head_loc.shape
        if (head_logits.shape != (b, k) or head_scale.shape not in (head_loc.shape, (1, 1, d))
                or tail_loc.dim() != 2 or tail_scale.shape != tail_loc.shape
                or tail_logits.shape != (b, tail_loc.shape[0])):
            raise ValueError("HeadTailMixture needs head_logits (B, k), head_loc (B, k, D), head_scale (B, k, D) or "
                             "(1, 1, D), tail_logits "
                             f"(B, M), tail_loc and tail_scale (M, D); got {tuple(head_logits.shape)}, "
                             f"{tuple(head_loc.shape)}, {tuple(tail_logits.shape)}, {tuple(tail_loc.shape)}")
        self.head_loc, self.head_scale, self.tail_loc, self.tail_scale = head_loc, head_scale, tail_loc, tail_scale
        self.max_elements, self._components = max_elements, None
        logits = torch.cat([head_logits, tail_logits], -1)
        self.log_mass = logits.logsumexp(-1) if unnormalized else None
        placeholder = head_loc.new_ones(()).expand(b, k + tail_loc.shape[0], d)  # shapes only; see below
        super().__init__(dist.Categorical(logits=logits),
                         dist.Normal(placeholder, placeholder, validate_args=False).to_event(1),
                         validate_args=validate_args)

    @property
    def component_distribution(self) -> dist.Distribution:
        if self._components is None:  # materialized (B, k + M, D) only for mean / variance / sample
            b = self.head_loc.shape[0]
            loc = torch.cat([self.head_loc, self.tail_loc.expand(b, -1, -1)], 1)
            scale = torch.cat([self.head_scale.expand_as(self.head_loc), self.tail_scale.expand(b, -1, -1)], 1)
            self._components = dist.Normal(loc, scale, validate_args=False).to_event(1)
        return self._components.expand(self.batch_shape + self._components.batch_shape[-1:])

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(HeadTailMixture, _instance)
        for name in ("head_loc", "head_scale", "tail_loc", "tail_scale", "max_elements", "_components", "log_mass"):
            setattr(new, name, getattr(self, name))
        return super().expand(batch_shape, _instance=new)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        num_points, k, d = self.head_loc.shape
        shape = torch.broadcast_shapes(value.shape[:-1], self.batch_shape)
        if shape[-1] != num_points:
            raise ValueError(f"value of shape {tuple(value.shape)} does not end with the batch size {num_points}")
        z = value.expand(shape + value.shape[-1:]).reshape(-1, num_points, d)  # (S, B, D)
        log_w = self.mixture_distribution.logits.reshape(-1, num_points, k + self.tail_loc.shape[0])[0]
        if self.head_scale.shape[:2] == (1, 1) and self.head_scale.stride(-1) == 0:  # one isotropic scale
            squares = _SquaredDistances.apply(z, self.head_loc) * self.head_scale[0, 0, 0].pow(-2)
        elif self.head_scale.shape[:2] == (1, 1):  # one scale for the whole head: the quadratic form by bmm
            precision = self.head_scale[0, 0].pow(-2)  # (D,)
            cross = torch.bmm(self.head_loc, (z * precision).permute(1, 2, 0)).permute(2, 0, 1)  # (S, B, k)
            squares = (z.pow(2) @ precision)[..., None] - 2 * cross + self.head_loc.pow(2) @ precision
        else:
            squares = ((z[:, :, None] - self.head_loc) / self.head_scale).pow(2).sum(-1)
        head = -0.5 * squares - self.head_scale.log().sum(-1) - 0.5 * d * math.log(2 * math.pi)  # (S, B, k)
        queries = z.reshape(-1, d)
        step = max(1, self.max_elements // self.tail_loc.shape[0])
        tail = torch.cat([gaussian_log_density_matrix(queries[i : i + step], self.tail_loc, self.tail_scale)
                          for i in range(0, queries.shape[0], step)]).view(z.shape[0], num_points, -1)
        out = logsumexp_rows(torch.cat([head, tail], -1) + log_w, overwrite=True).reshape(shape)
        return out if self.log_mass is None else out + self.log_mass


class SearchedHeadTail(dist.TorchDistribution):
    """A ``HeadTailMixture`` whose head depends on the point z it is evaluated at (batch shape (B,), event (D,)):
    ``log_prob(z)`` scores z under ``build(z)``, the mixture whose head holds what a search around z found.

    Given z the head is fixed and the tail draws it excludes are still i.i.d. uniform over the others, so
    ``build(z)``'s density is unbiased for the mixture's at z, as a ``HeadTailMixture``'s is. ``sample`` (which
    has no z yet) draws from ``base()``, the mixture without the search.
    """

    arg_constraints: dict = {}
    support = dist.constraints.real_vector

    def __init__(self, build, base, batch_size: int, dim: int, validate_args: bool | None = None):
        self._build, self._base = build, base
        super().__init__(torch.Size([batch_size]), torch.Size([dim]), validate_args=validate_args)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        b, d = self.batch_shape[0], self.event_shape[0]
        shape = torch.broadcast_shapes(value.shape[:-1], self.batch_shape)
        flat = value.expand(shape + (d,)).reshape(-1, b, d)  # each sample's z has its own search
        return torch.stack([self._build(z).log_prob(z) for z in flat]).reshape(shape)

    def sample(self, sample_shape: tuple[int, ...] = ()) -> torch.Tensor:
        return self._base().sample(sample_shape)

    def expand(self, batch_shape, _instance=None):
        if torch.Size(batch_shape) != self.batch_shape:
            raise ValueError(f"a SearchedHeadTail of batch shape {tuple(self.batch_shape)} cannot be expanded to "
                             f"{tuple(batch_shape)}")
        return self
