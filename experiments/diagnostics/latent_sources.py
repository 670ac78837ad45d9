"""Which latent distribution to generate from, scored by held-out likelihood.

Decoding z ~ s(z) through p(x|z) defines a generative model p_s(x) = ∫ p(x|z) s(z) dz. Its held-out
log-likelihood is estimated by importance sampling with the pair's own guide as the proposal:

    log p_s(x_n) ≈ log 1/S sum_k p(x_n|z_k) s(z_k) / q(z_k|x_n),     z_k ~ q(z|x_n)

for s = p(z) (the pair's own prior: its test log p(x)), s = q_agg (the exact N-component mixture of the training
encodings, Hoffman & Johnson 2016) and s = a GMM fitted to the training encodings (Ghosh et al. 2020). The three
estimates share the same draws and test points, so they are compared per point (``evaluation.comparisons``).
Unlike the classifier-based sample scores this needs no labels, so it answers "generate from p(z) or from
q_agg?" on binarized MNIST too. q_agg excludes the test points, so it cannot win by memorizing them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import nn

from vae_priors.experiments.evaluation.log_weights import log_weights
from vae_priors.experiments.training import distributed

LogDensity = Callable[[torch.Tensor], torch.Tensor]  # z (M, D) -> log s(z) (M,)


@torch.no_grad()
def source_log_likelihoods(model: nn.Module, guide: nn.Module, x: torch.Tensor, sources: Mapping[str, LogDensity],
                           num_particles: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Per test point log p_s(x_n) (float64, shape (N,)) for ``"prior"`` and each named density in ``sources``.

    :param x: test points (N, x_dim) of an unconditional pair.
    :param sources: log-densities of the latent sources to score besides the model's own prior.

    Under a process group (torchrun) each rank scores its contiguous share of the points with its own random
    stream (rank 0 keeps ``seed``), and every rank gets all N back, in order.
    """
    if distributed.shards_points(x.shape[0]):
        mine = distributed.shard_points(x.shape[0]).to(x.device)
        scores = _score(model, guide, x[mine], sources, num_particles, distributed.point_seed(seed))
        return {name: distributed.gather_points(values, x.shape[0]) for name, values in scores.items()}
    return _score(model, guide, x, sources, num_particles, seed)


def _score(model: nn.Module, guide: nn.Module, x: torch.Tensor, sources: Mapping[str, LogDensity],
           num_particles: int, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    weights, z = log_weights(model, guide, (x,), num_particles, return_z=True)
    s, n = weights.log_q.shape
    base = weights.log_lik.double() - weights.log_q.double()  # log p(x|z) - log q(z|x), shared by every source
    out = {"prior": torch.logsumexp(base + weights.log_p_z.double(), 0) - math.log(s)}
    flat = z.reshape(s * n, -1)
    for name, log_density in sources.items():
        log_s = log_density(flat).double().reshape(s, n)
        out[name] = torch.logsumexp(base + log_s, 0) - math.log(s)
    return out
