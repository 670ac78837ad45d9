"""A batch of distributions as one object: slice it, join several, and tell whether all its members are equal.

The diagnostics read q(z|x_n) and p(z|x_n) for N points from Pyro traces in chunks; these helpers rebuild a
distribution with its batch-leading parameters sliced or concatenated, for the families the pairs use
(Normal and other parameter-only families, ``Independent``, ``MixtureSameFamily``, ``MultivariateNormal``, and the
mixture priors' ``GaussianMixture`` whose K components are shared by the batch).
"""

from __future__ import annotations

import torch
from torch.distributions import Distribution, Independent, MixtureSameFamily, MultivariateNormal


def _parts(d: Distribution) -> tuple[type, dict, dict]:
    """(class, batch-leading arguments, fixed arguments) that rebuild ``d``; raises for unknown families."""
    if isinstance(d, Independent):
        return type(d), {"base_distribution": d.base_dist}, {"reinterpreted_batch_ndims": d.reinterpreted_batch_ndims}
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
        raise TypeError(f"cannot split or join a batch of {type(d).__name__}; pass batch_size >= the number of points")
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
    new = {k: cat_batch([a[k] for a in args]) if isinstance(v, Distribution) else torch.cat([a[k] for a in args])
           for k, v in first.items()}
    return cls(**new, **fixed)


def batch_tensors(d: Distribution) -> list[torch.Tensor]:
    """The batch-leading parameter tensors of ``d`` (nested distributions flattened)."""
    return [t for v in _parts(d)[1].values() for t in (batch_tensors(v) if isinstance(v, Distribution) else [v])]


def shared_component(d: Distribution) -> Distribution | None:
    """The first component (batch of 1) if every component of ``d`` is identical, else None."""
    try:
        same = all(bool((t == t[:1]).all()) for t in batch_tensors(d))
    except TypeError:
        return None
    return map_batch(d, lambda t: t[:1]) if same else None
