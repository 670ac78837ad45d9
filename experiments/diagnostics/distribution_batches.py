"""A batch of distributions as one object: slice it, join several, and tell whether all its members are equal.

The diagnostics read q(z|x_n) and p(z|x_n) for N points from Pyro traces in chunks; these helpers rebuild a
distribution with its batch-leading parameters sliced or concatenated, for the families the pairs use
(Normal and other parameter-only families, ``Independent``, ``MixtureSameFamily``, ``MultivariateNormal``, the
mixture priors' ``GaussianMixture`` whose K components are shared by the batch, and ``TransformedDistribution``:
flows and other transforms whose parameters are shared by the batch -- a prior's -- and ``AffineTransform``s whose
loc/scale carry the batch, as a guide written as an affine map of N(0, I) has).
"""

from __future__ import annotations

import torch
from torch.distributions import (
    AffineTransform,
    Distribution,
    Independent,
    MixtureSameFamily,
    MultivariateNormal,
    TransformedDistribution,
)


class _BatchedAffine:
    """An ``AffineTransform`` whose loc/scale carry the batch: sliced and joined with the base distribution."""

    def __init__(self, transform: AffineTransform, full_ndim: int):
        self.transform, self.full_ndim = transform, full_ndim

    def tensors(self) -> dict[str, torch.Tensor]:
        t = self.transform
        pairs = (("loc", t.loc), ("scale", t.scale))
        return {k: v for k, v in pairs if torch.is_tensor(v) and v.ndim == self.full_ndim}

    def rebuild(self, new: dict[str, torch.Tensor]) -> AffineTransform:
        t = self.transform
        return AffineTransform(new.get("loc", t.loc), new.get("scale", t.scale), event_dim=t.event_dim)


def _transformed_parts(d: TransformedDistribution) -> tuple[type, dict, dict]:
    full_ndim = len(d.batch_shape) + len(d.event_shape)
    args = {"base_distribution": d.base_dist}
    for i, t in enumerate(d.transforms):
        if isinstance(t, AffineTransform) and _BatchedAffine(t, full_ndim).tensors():
            for k, v in _BatchedAffine(t, full_ndim).tensors().items():
                args[f"affine{i}.{k}"] = v
    return _TransformedBuilder(type(d), d.transforms, full_ndim), args, {}


class _TransformedBuilder:
    """Rebuilds a ``TransformedDistribution`` from its (sliced or joined) batch-leading tensors."""

    def __init__(self, cls: type, transforms: list, full_ndim: int):
        self.cls, self.transforms, self.full_ndim = cls, transforms, full_ndim

    def __call__(self, base_distribution: Distribution, **affine: torch.Tensor) -> TransformedDistribution:
        transforms = []
        for i, t in enumerate(self.transforms):
            new = {k.split(".", 1)[1]: v for k, v in affine.items() if k.startswith(f"affine{i}.")}
            transforms.append(_BatchedAffine(t, self.full_ndim).rebuild(new) if new else t)
        return self.cls(base_distribution, transforms)


def _parts(d: Distribution) -> tuple[type, dict, dict]:
    """(class, batch-leading arguments, fixed arguments) that rebuild ``d``; raises for unknown families."""
    if isinstance(d, Independent):
        return type(d), {"base_distribution": d.base_dist}, {"reinterpreted_batch_ndims": d.reinterpreted_batch_ndims}
    if isinstance(d, TransformedDistribution):
        return _transformed_parts(d)
    if hasattr(d, "point_logits"):  # models.mixture_distributions.GaussianMixture: K components shared by the batch
        logits = d.point_logits.expand(d.batch_shape + d.point_logits.shape[-1:])
        return type(d), {"logits": logits}, {"loc": d.loc, "scale": d.scale, "max_elements": d.max_elements}
    if isinstance(d, MixtureSameFamily):
        return type(d), {"mixture_distribution": d.mixture_distribution,
                         "component_distribution": d.component_distribution}, {}
    if isinstance(d, MultivariateNormal):
        return type(d), {"loc": d.loc, "scale_tril": d.scale_tril}, {}
    names = [k for k in d.arg_constraints if k in vars(d)]
    if not names:
        raise TypeError(f"cannot split or join a batch of {type(d).__name__} (no batch-leading parameters found); "
                        "the diagnostics support parameter families, Independent, mixtures, MultivariateNormal and "
                        "TransformedDistribution -- wrap yours in one of these")
    if type(d).__name__ == "Categorical":
        names = ["logits"]
    return type(d), {k: getattr(d, k) for k in names}, {}


def map_batch(d: Distribution, fn) -> Distribution:
    """Rebuild ``d`` with ``fn`` applied to every parameter tensor (leading axis = batch), e.g. a slice."""
    cls, args, fixed = _parts(d)
    new = {k: map_batch(v, fn) if isinstance(v, Distribution) else fn(v) for k, v in args.items()}
    return cls(**new, **fixed)


def cat_batch(parts: list[Distribution]) -> Distribution:
    """Join distributions of the same family along their (leading) batch axis."""
    if len(parts) == 1:
        return parts[0]
    cls, first, fixed = _parts(parts[0])
    args = [_parts(d)[1] for d in parts]
    new = {k: cat_batch([a[k] for a in args]) if isinstance(v, Distribution) else _cat_rows([a[k] for a in args])
           for k, v in first.items()}
    return cls(**new, **fixed)


def _is_broadcast_row(t: torch.Tensor) -> bool:
    """True for one row expanded along the batch axis (stride 0): every member shares it without a copy."""
    return t.ndim > 0 and (t.shape[0] <= 1 or t.stride(0) == 0)


def _cat_rows(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat`` along the batch axis, except that parts which all expand one same row stay one expanded row.

    A prior shared by every point (e.g. the exemplar prior's N-component mixture in evaluation mode) arrives as an
    expanded (B, K) view per chunk; joined by ``torch.cat`` the chunks of N points would hold N x K numbers.
    """
    first = tensors[0]
    if all(_is_broadcast_row(t) and t.shape[1:] == first.shape[1:] for t in tensors) and all(
            t.shape[0] == 0 or torch.equal(t[:1], first[:1]) for t in tensors):
        return first[:1].expand(sum(t.shape[0] for t in tensors), *first.shape[1:])
    return torch.cat(tensors)


def batch_tensors(d: Distribution) -> list[torch.Tensor]:
    """The batch-leading parameter tensors of ``d`` (nested distributions flattened)."""
    return [t for v in _parts(d)[1].values() for t in (batch_tensors(v) if isinstance(v, Distribution) else [v])]


def shared_component(d: Distribution) -> Distribution | None:
    """The first component (batch of 1) if every component of ``d`` is identical, else None."""
    try:  # an expanded row is equal to itself without comparing N copies
        same = all(_is_broadcast_row(t) or bool((t == t[:1]).all()) for t in batch_tensors(d))
    except TypeError:
        return None
    return map_batch(d, lambda t: t[:1]) if same else None
