"""Per-data-point, per-draw log weights of any pair, computed from Pyro traces.

For S draws z_s ~ q(z|x_n) (the guide, traced inside ``pyro.plate("particles", S, dim=-2)``), the model
is replayed on the same z and each site's log-density is read off the traces:

    log_q[s, n]     = log q(z_s | x_n)                 (guide's "z")
    log_p_z[s, n]   = log p(z_s)  or  log p(z_s | x_n)  (model's "z": whatever prior the pair has)
    log_lik[s, n]   = log p(x_n | z_s)  or  log p(y_n | x_n, z_s)   (the model's observed sites)
    log_w           = log_lik + log_p_z - log_q

Nothing here knows which pair it runs: a new pair gets these numbers with no extra code. Points are
processed in chunks so that no tensor exceeds ``max_elements`` floats per site (S x chunk x width).
"""

from __future__ import annotations

from dataclasses import dataclass

import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.util import prune_subsample_sites
from torch import nn

from vae_priors.models.plate import subsample

DEFAULT_MAX_ELEMENTS = 2**24  # 64 MB of float32 per site and chunk


@dataclass
class LogWeights:
    """Tensors of shape (S, N): draws on the first axis, data points on the second."""

    log_q: torch.Tensor
    log_p_z: torch.Tensor
    log_lik: torch.Tensor

    @property
    def log_w(self) -> torch.Tensor:
        return self.log_lik + self.log_p_z - self.log_q


def _site_log_probs(model: nn.Module, guide: nn.Module, args: tuple, num_particles: int):
    with pyro.plate("particles", num_particles, dim=-2):
        guide_trace = poutine.trace(guide).get_trace(*args)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args)
    model_trace, guide_trace = prune_subsample_sites(model_trace), prune_subsample_sites(guide_trace)
    model_trace.compute_log_prob()
    guide_trace.compute_log_prob()
    unobserved = [n for n, s in model_trace.nodes.items()
                  if s["type"] == "sample" and not s["is_observed"] and n != "z"]
    if unobserved:
        raise ValueError(f"the model has latent sites {unobserved} besides 'z'; the contract allows one latent "
                         "site 'z'")
    if "z" not in model_trace.nodes or "z" not in guide_trace.nodes:
        raise ValueError("model and guide must both have a sample site named 'z' (see the contract in the README)")
    shape = (num_particles, args[0].shape[0])
    log_lik = sum(s["unscaled_log_prob"].expand(shape) for s in model_trace.nodes.values()
                  if s["type"] == "sample" and s["is_observed"])
    return (guide_trace.nodes["z"]["unscaled_log_prob"].expand(shape),
            model_trace.nodes["z"]["unscaled_log_prob"].expand(shape), log_lik,
            guide_trace.nodes["z"]["value"])


def chunk_size(num_particles: int, width: int, max_elements: int = DEFAULT_MAX_ELEMENTS) -> int:
    """How many data points fit in one chunk: S x chunk x width <= max_elements."""
    return max(1, max_elements // (num_particles * max(width, 1)))


@torch.no_grad()
def log_weights(model: nn.Module, guide: nn.Module, args: tuple[torch.Tensor, ...], num_particles: int,
                max_elements: int = DEFAULT_MAX_ELEMENTS, return_z: bool = False):
    """Log weights (S, N) for the points in ``args`` (``(x,)`` or ``(x, y)``), with S = ``num_particles``.

    Memory: at most ``max_elements`` floats per site and chunk, i.e. chunks of
    ``max_elements // (S * widest data width)`` points. With ``return_z`` the draws (S, N, latent_dim)
    come back too (that tensor is not bounded: ask for it only on a subset of points).
    """
    width = max(max(a.shape[-1] for a in args), 1)
    step = chunk_size(num_particles, width, max_elements)
    parts, zs, n = [], [], args[0].shape[0]
    was_training = model.training, guide.training
    model.eval(), guide.eval()
    try:
        for start in range(0, n, step):
            index = torch.arange(start, min(start + step, n), device=args[0].device)
            chunk = tuple(a[index] for a in args)
            with subsample(index, n):  # a per-point guide must read the parameters of these points, not of 0..chunk
                *lp, z = _site_log_probs(model, guide, chunk, num_particles)
            parts.append(lp)
            if return_z:
                zs.append(z.reshape(num_particles, chunk[0].shape[0], -1))
    finally:
        model.train(was_training[0]), guide.train(was_training[1])
    result = LogWeights(*(torch.cat(t, dim=1) for t in zip(*parts, strict=True)))
    return (result, torch.cat(zs, dim=1)) if return_z else result
