"""The ``"data"`` plate of the model/guide contract.

Every model and guide puts its per-data-point sites inside ``data_plate(batch_size)``. Outside a training
loop this is ``pyro.plate("data", batch_size)``: the batch is the whole data set. Inside
``subsample(index, size)`` -- which the SVI loop enters around each minibatch -- it becomes
``pyro.plate("data", size=size, subsample=index)``, so Pyro scales every site in it by ``size / len(index)``
and the reported ELBO is an unbiased estimate for the full data set (pyro-ppl/pyro#1437).

Entering the plate yields the indices of the points in the batch; a non-amortized guide uses them to
select its per-point parameters, and a prior over training points uses them for leave-one-out.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import pyro
import torch

_SUBSAMPLE: ContextVar[tuple[torch.Tensor, int] | None] = ContextVar("vae_priors_subsample", default=None)


@contextlib.contextmanager
def subsample(index: torch.Tensor, size: int) -> Iterator[None]:
    """Make every ``data_plate`` inside this block a subsample ``index`` of a data set of ``size`` points."""
    token = _SUBSAMPLE.set((index, int(size)))
    try:
        yield
    finally:
        _SUBSAMPLE.reset(token)


def data_plate(batch_size: int, device: torch.device | None = None) -> pyro.plate:
    """``pyro.plate("data", ...)`` at dim -1, sized and subsampled by the enclosing :func:`subsample`."""
    current = _SUBSAMPLE.get()
    if current is None:
        return pyro.plate("data", batch_size, dim=-1, device=device)
    index, size = current
    if index.shape[0] != batch_size:
        raise ValueError(f"the batch has {batch_size} points but the subsample index has {index.shape[0]}")
    return pyro.plate("data", size=size, subsample=index.to(device) if device else index, dim=-1)
