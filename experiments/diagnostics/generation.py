"""Generating after training: decode z from p(z), from the aggregated posterior, or from an ex-post mixture.

A latent sampler is separate from the model (as in pythae): the same decoder is fed z from

* ``"prior"``: the model's own ``"z"`` site, read off a trace of the model -- so N(0, I), a mixture prior or
  any prior a new pair brings is sampled with no extra code;
* ``"q_agg"``: the aggregated posterior q_agg(z) = 1/N sum_n q(z|x_n) over the training encodings, the exact
  N-component mixture (Hoffman & Johnson 2016; ``experiments.aggregate.sample_q_agg``);
* ``"gmm"``: a Gaussian mixture fitted ex post to the training encodings (Ghosh et al. 2020, "From variational
  to deterministic autoencoders", section 4: ex-post density estimation) -- one draw z ~ q(z|x_n) per training
  point, so that it models q_agg with its spread --, with
  ``GMM_COMPONENTS`` full-covariance components (fewer when there are fewer distinct points).

Decoding goes through the contract only: the model runs with ``"z"`` conditioned (``poutine.condition``) and
the distribution at its observed site gives the decoded image (``fn.mean``, shown in grids) and a draw
x ~ p(x|z) (``fn.sample()``, what the sample scores use: the test split holds draws, not means).

Conditional pairs p(y|x) have no "generate from nothing": for them generation is prediction of y for a test x
with z ~ p(z|x) (the model's ``"z"`` site, ``model(x, y=None)``), shown next to the truth and next to the
reconstruction through q(z|x,y). Only unconditional pairs get the three-source generation section.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.poutine.util import prune_subsample_sites
from torch import nn

GMM_COMPONENTS = 10  # Ghosh et al. (2020) use 10 components on MNIST-size data
GMM_COVARIANCE = "full"
SOURCES = ("prior", "q_agg", "gmm")


class LatentSampler(Protocol):
    """Draws z for the decoder: ``sample(num, seed) -> (num, latent_dim)``."""

    description: str

    def sample(self, num: int, seed: int) -> torch.Tensor: ...


def _observed_site(trace: poutine.Trace) -> dict:
    """The model's one sample site besides ``"z"`` (the observed x, or y for conditional pairs)."""
    sites = [s for name, s in prune_subsample_sites(trace).nodes.items() if s["type"] == "sample" and name != "z"]
    if len(sites) != 1:
        raise ValueError(f"decoding needs exactly one observed site besides 'z', found {[s['name'] for s in sites]}")
    return sites[0]


def _check_z(trace: poutine.Trace) -> None:
    if "z" not in trace.nodes:
        raise ValueError("the model has no sample site 'z'; see the model/guide contract in experiments/registry.py")


@dataclass
class Decoded:
    """The decoder's output for each z: ``mean`` = E[x|z] (for grids), ``draw`` = one x ~ p(x|z) (for scores)."""

    mean: torch.Tensor
    draw: torch.Tensor


@torch.no_grad()
def decode(model: nn.Module, z: torch.Tensor, args: tuple[torch.Tensor, ...] | None = None, seed: int = 0,
           x_dim: int | None = None) -> Decoded:
    """Run ``model(*args)`` with ``"z"`` conditioned on ``z`` (num, latent_dim) and read its observed site.

    ``args`` are the model's arguments for ``num`` points: ``(x,)`` or ``(x, None)`` for a conditional pair (x is
    what p(y|x,z) conditions on). An unconditional model does not read x when z is given, so it needs no ``args``:
    pass the data width ``x_dim`` instead (``decode(model, z, x_dim=784)``).
    """
    if args is None:
        if x_dim is None:
            raise ValueError("decode needs the model's arguments args=(x,) / (x, None), or x_dim for an "
                             "unconditional model")
        args = (torch.zeros(z.shape[0], x_dim, device=z.device),)  # only its shape is read: obs is not used
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        trace = poutine.trace(poutine.condition(model, data={"z": z})).get_trace(*args)
        _check_z(trace)
        fn = _observed_site(trace)["fn"]
        return Decoded(fn.mean, fn.sample())


class PriorSampler:
    """z from the model's own ``"z"`` site: the model is traced on ``num`` placeholder points."""

    description = "p(z): the model's own prior (its \"z\" site)"

    def __init__(self, model: nn.Module, x_dim: int):
        self.model, self.x_dim = model, x_dim

    @torch.no_grad()
    def sample(self, num: int, seed: int) -> torch.Tensor:
        placeholder = torch.zeros(num, self.x_dim)  # an unconditional prior does not read x
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            trace = poutine.trace(self.model).get_trace(placeholder)
        _check_z(trace)
        return trace.nodes["z"]["value"].reshape(num, -1)


class AggregatePosteriorSampler:
    """z from q_agg(z) = 1/N sum_n q(z|x_n), the exact mixture over the N training encodings."""

    description = "q_agg(z): the exact mixture of the training points' q(z|x_n)"

    def __init__(self, components: dist.Distribution):
        self.components = components

    def sample(self, num: int, seed: int) -> torch.Tensor:
        from vae_priors.experiments.diagnostics.aggregate import sample_q_agg

        return sample_q_agg(self.components, num, seed)


class GaussianMixtureSampler:
    """z from a Gaussian mixture fitted ex post (scikit-learn, EM) to points in latent space (the encodings).

    Ghosh et al. (2020): fitting a simple density to the encodings after training closes the gap between
    p(z) and where the decoder was trained. ``num_components`` is capped by the number of distinct points.
    """

    def __init__(self, points: torch.Tensor, num_components: int = GMM_COMPONENTS,
                 covariance_type: str = GMM_COVARIANCE, seed: int = 0):
        from sklearn.mixture import GaussianMixture
        from threadpoolctl import threadpool_limits

        points = points.detach().double().cpu().numpy()
        distinct = len(np.unique(points.round(6), axis=0))
        self.num_components = max(1, min(num_components, distinct))
        self.covariance_type = covariance_type
        self.description = (f"GMM: {self.num_components}-component {covariance_type}-covariance Gaussian mixture "
                            "fitted to the training encodings (Ghosh et al. 2020)")
        # One BLAS/OpenMP thread: on a small CPU shared with torch, more threads made the fit 15x slower.
        with warnings.catch_warnings(), threadpool_limits(1):
            warnings.simplefilter("ignore")  # EM convergence notes on near-duplicate encodings (constant guide)
            gmm = GaussianMixture(self.num_components, covariance_type=covariance_type, random_state=seed).fit(points)
        cov = torch.as_tensor(_full_covariances(gmm, points.shape[1]), dtype=torch.float32)
        self.mixture = dist.MixtureSameFamily(
            dist.Categorical(probs=torch.as_tensor(gmm.weights_, dtype=torch.float32)),
            dist.MultivariateNormal(torch.as_tensor(gmm.means_, dtype=torch.float32), covariance_matrix=cov))

    def sample(self, num: int, seed: int) -> torch.Tensor:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return self.mixture.sample((num,))


def _full_covariances(gmm, dim: int) -> np.ndarray:
    """(K, D, D) covariance matrices from any scikit-learn covariance type."""
    k, cov = gmm.n_components, gmm.covariances_
    if gmm.covariance_type == "full":
        return cov
    if gmm.covariance_type == "tied":
        return np.broadcast_to(cov, (k, dim, dim)).copy()
    if gmm.covariance_type == "diag":
        return np.stack([np.diag(c) for c in cov])
    return np.stack([np.eye(dim) * c for c in cov])  # spherical


def latent_samplers(model: nn.Module, components: dist.Distribution, x_dim: int,
                    seed: int = 0) -> dict[str, LatentSampler]:
    """The three sources for an unconditional pair; ``components`` = q(z|x_n) of the training points."""
    # The GMM is fitted to one draw z ~ q(z|x_n) per training point, not to the means: it then models q_agg with its
    # spread, and its density covers where the guide puts z (fitted to the means, a collapsed dimension gets a
    # near-zero variance and any likelihood scored with q as the proposal becomes meaningless).
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        draws = components.sample().reshape(-1, components.event_shape[-1])
    return {"prior": PriorSampler(model, x_dim), "q_agg": AggregatePosteriorSampler(components),
            "gmm": GaussianMixtureSampler(draws, seed=seed)}


def generate(model: nn.Module, samplers: dict[str, LatentSampler], x_dim: int, num: int,
             seed: int = 0) -> dict[str, Decoded]:
    """Decode ``num`` draws from each sampler (same seed for each source, so runs are reproducible)."""
    placeholder = (torch.zeros(num, x_dim),)
    return {name: decode(model, sampler.sample(num, seed), placeholder, seed) for name, sampler in samplers.items()}


@torch.no_grad()
def reconstruct(model: nn.Module, guide: nn.Module, args: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """E[x|z] (or E[y|x,z]) at z = the mean of the guide's q(z|.) for the points in ``args``."""
    trace = poutine.trace(guide).get_trace(*args)
    _check_z(trace)
    z = trace.nodes["z"]["fn"].mean
    return decode(model, z, args).mean


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, num_draws: int, seed: int = 0) -> torch.Tensor:
    """Conditional pairs: E[y|x,z] for ``num_draws`` draws z ~ p(z|x); shape (num_draws, N, y_dim)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        out = []
        for _ in range(num_draws):
            trace = poutine.trace(model).get_trace(x, None)
            _check_z(trace)
            out.append(_observed_site(trace)["fn"].mean)
    return torch.stack(out)
