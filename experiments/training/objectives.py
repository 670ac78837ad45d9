"""Training objectives as Pyro ``ELBO`` objects, and the KL weight used for warm-up.

* ``trace``: ``Trace_ELBO``, E_q[log p(x, z) - log q(z|x)] with reparameterized draws;
* ``meanfield``: ``TraceMeanField_ELBO``, the same with KL(q || p) in closed form where torch's KL
  registry has the pair (Normal vs Normal) and Monte Carlo otherwise (e.g. a mixture prior);
* ``iwae``: the importance-weighted bound of Burda et al. (2016),
  L_K = sum_n E[log 1/K sum_k p(x_n, z_k) / q(z_k|x_n)], z_k ~ q(z|x_n).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import pyro.poutine as poutine
import torch
from pyro.infer import ELBO, RenyiELBO, Trace_ELBO, TraceMeanField_ELBO
from pyro.poutine.scale_messenger import ScaleMessenger


class IWAE(RenyiELBO):
    """``RenyiELBO(alpha=0, num_particles=K)`` with a correct ``differentiable_loss`` under subsampling.

    Pyro's ``RenyiELBO`` has no ``differentiable_loss`` (so it cannot be used as ``ELBO(...)(model, guide)``),
    and it log-mean-exps the plate-scaled log weights, which is not the IWAE bound when the data plate is
    subsampled. Here each point's log weight is unscaled first, log-mean-exp'ed over the K particles, and
    only then multiplied by the subsample scale N / B.
    """

    def __init__(self, num_particles: int):
        super().__init__(alpha=0.0, num_particles=num_particles, vectorize_particles=True, max_plate_nesting=1)

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        (model_trace, guide_trace), = self._get_traces(model, guide, args, kwargs)
        log_w, data_scale = 0.0, 1.0
        for sign, trace in ((1.0, model_trace), (-1.0, guide_trace)):
            for site in trace.nodes.values():
                if site["type"] == "sample":
                    log_w = log_w + sign * site["log_prob"]  # (K, B): scaled by N/B (and by beta on "z")
                    if site["is_observed"]:
                        data_scale = site["scale"]
        log_w = log_w / data_scale  # per-point weights, KL weight kept
        log_w = log_w.reshape(self.num_particles, -1)
        bound = torch.logsumexp(log_w, dim=0) - math.log(self.num_particles)
        return -data_scale * bound.sum()


def make_elbo(objective: str, num_particles: int = 1) -> ELBO:
    """The ``ELBO`` for ``objective`` in {"trace", "meanfield", "iwae"}."""
    if objective == "trace":
        return Trace_ELBO(num_particles=num_particles, vectorize_particles=num_particles > 1, max_plate_nesting=1)
    if objective == "meanfield":
        return TraceMeanField_ELBO(num_particles=num_particles, vectorize_particles=num_particles > 1,
                                   max_plate_nesting=1)
    if objective == "iwae":
        return IWAE(num_particles)
    raise ValueError(f"unknown objective {objective!r}; choose trace, meanfield or iwae")


class _LatentScale(ScaleMessenger):
    """``poutine.scale`` restricted to the latent site ``"z"`` (in model and guide alike)."""

    def _process_message(self, msg) -> None:
        if msg["name"] == "z":
            super()._process_message(msg)


@contextlib.contextmanager
def kl_weight(beta: float) -> Iterator[None]:
    """Weight log p(z) - log q(z|x) by ``beta`` for every pair run inside the block (KL warm-up, beta-VAE).

    The objective becomes E_q[log p(x|z)] - beta * KL(q(z|x) || p(z)); with ``beta == 1`` nothing is changed.
    """
    if beta == 1.0:
        yield
        return
    with _LatentScale(beta):
        yield


__all__ = ["IWAE", "kl_weight", "make_elbo", "poutine"]
