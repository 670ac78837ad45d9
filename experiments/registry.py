"""The variants: name -> factory that builds a model/guide ``Pair`` for a data set, and a one-line description.

The contract every pair follows (see the README, "The model/guide contract"):

* model and guide are ``nn.Module``s called with the same arguments: ``(x)`` for unconditional pairs,
  ``(x, y=None)`` for conditional ones;
* the model has one latent sample site ``"z"`` (event shape ``[latent_dim]``) and its observed site inside
  ``models.plate.data_plate`` (``pyro.plate("data", size=N, subsample=...)`` at dim -1); the guide samples
  ``"z"`` in the same plate;
* the distribution at the model's ``"z"`` site IS the prior for that data point.

To add a variant: write the model or guide module, then one ``@register`` factory here -- or, without touching
the package, in a module of your own that you name with ``--import MODULE`` / ``imports = ["MODULE"]`` in a config,
or in an installed package's ``vae_priors.pairs`` entry point (``import_pairs``).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib.metadata import entry_points

import torch
from pyro.infer import ELBO
from torch import nn

from vae_priors.experiments.config import ModelConfig
from vae_priors.experiments.data.datasets import Dataset
from vae_priors.guides.amortized_normal import AmortizedNormalGuide, ConditionalAmortizedNormalGuide, PriorNetGuide
from vae_priors.guides.constant_normal import ConstantNormalGuide
from vae_priors.guides.local_normal import LocalNormalGuide
from vae_priors.models.cvae import ConditionalVAE
from vae_priors.models.decoders import ConditionalMLPDecoder, MLPDecoder
from vae_priors.models.exemplar_prior import ExemplarPrior
from vae_priors.models.likelihoods import make_likelihood
from vae_priors.models.mixture_priors import VampPrior
from vae_priors.models.priors import ConditionalNormalPrior, StandardNormalPrior
from vae_priors.models.vae import VAE


@dataclass
class Pair:
    """A model and its guide. ``objective(elbo)`` is the ``nn.Module`` that training minimizes."""

    model: nn.Module
    guide: nn.Module
    conditional: bool = False

    def objective(self, elbo: ELBO) -> nn.Module:
        return elbo(self.model, self.guide)


class WeightedObjective(nn.Module):
    """sum_i w_i * loss_i over several ELBO modules that share networks (their parameters are deduplicated)."""

    def __init__(self, losses: list[nn.Module], weights: list[float]):
        super().__init__()
        self.losses = nn.ModuleList(losses)
        self.weights = weights

    def forward(self, *args, **kwargs):
        return sum(w * loss(*args, **kwargs) for w, loss in zip(self.weights, self.losses, strict=True) if w)


@dataclass
class HybridPair(Pair):
    """Sohn et al. (2015) section 4.2: L = alpha * L_CVAE + (1 - alpha) * L_GSNN.

    The CVAE term uses the recognition guide q(z|x,y); the GSNN term uses the prior network p(z|x) as the
    proposal, so it trains the generation path on the z that prediction will use.
    """

    alpha: float = 0.5
    prior_guide: nn.Module | None = None

    def objective(self, elbo: ELBO) -> nn.Module:
        return WeightedObjective([elbo(self.model, self.guide), elbo(self.model, self.prior_guide)],
                                 [self.alpha, 1.0 - self.alpha])


PairFactory = Callable[[Dataset, ModelConfig, str], Pair]


@dataclass(frozen=True)
class Variant:
    name: str
    factory: PairFactory
    description: str
    conditional: bool


VARIANTS: dict[str, Variant] = {}


def register(name: str, description: str, conditional: bool = False) -> Callable[[PairFactory], PairFactory]:
    """Add ``factory(data, model_config, likelihood) -> Pair`` to the registry under ``name``."""

    def add(factory: PairFactory) -> PairFactory:
        if name in VARIANTS:
            raise ValueError(f"variant {name!r} is registered twice")
        VARIANTS[name] = Variant(name, factory, description, conditional)
        return factory

    return add


def get_variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise KeyError(f"unknown variant {name!r}; `vae-priors list` shows the registered ones: {', '.join(VARIANTS)}"
                       "; for a pair of your own, name the module that registers it: --import MODULE or "
                       "imports = [\"MODULE\"] in the config")
    return VARIANTS[name]


def _encoder(data: Dataset, cfg: ModelConfig) -> AmortizedNormalGuide:
    return AmortizedNormalGuide(data.x_dim, cfg.hidden, cfg.latent_dim, cfg.layer)


def _vae(data: Dataset, cfg: ModelConfig, likelihood: str, prior: nn.Module, guide: nn.Module) -> Pair:
    decoder = MLPDecoder(cfg.latent_dim, cfg.hidden[::-1], data.x_dim, cfg.layer)
    return Pair(VAE(prior, decoder, make_likelihood(likelihood, data.x_dim)), guide)


@register("vae", "N(0, I) prior, MLP decoder p(x|z), amortized Gaussian guide q(z|x)")
def vae(data: Dataset, cfg: ModelConfig, likelihood: str) -> Pair:
    guide = _encoder(data, cfg)
    return _vae(data, cfg, likelihood, StandardNormalPrior(cfg.latent_dim), guide)


@register("vae-constant-guide", "control: q(z) = N(mu, sigma^2) with learned constants that ignore x")
def vae_constant_guide(data: Dataset, cfg: ModelConfig, likelihood: str) -> Pair:
    return _vae(data, cfg, likelihood, StandardNormalPrior(cfg.latent_dim), ConstantNormalGuide(cfg.latent_dim))


@register("vae-local-guide", "non-amortized (mu_n, sigma_n) per training point; same decoder as vae")
def vae_local_guide(data: Dataset, cfg: ModelConfig, likelihood: str) -> Pair:
    guide = LocalNormalGuide(len(data.train), cfg.latent_dim)
    return _vae(data, cfg, likelihood, StandardNormalPrior(cfg.latent_dim), guide)


@register("vae-vamp", "VampPrior: p(z) = 1/K sum_k q(z|u_k) over K learned pseudo-inputs (Tomczak & Welling 2018)")
def vae_vamp(data: Dataset, cfg: ModelConfig, likelihood: str) -> Pair:
    guide = _encoder(data, cfg)
    n = len(data.train)
    if not 1 <= cfg.num_pseudo_inputs <= n:
        raise ValueError(f"model.num_pseudo_inputs = {cfg.num_pseudo_inputs} must be in [1, {n}] (they start at "
                         "distinct training points); lower it or use more training data")
    bounded = likelihood == "bernoulli"
    if cfg.pseudo_inputs == "reference" and bounded:
        init, link = VampPrior.reference_init(cfg.num_pseudo_inputs, data.x_dim), "hardtanh"
    else:
        init, link = data.train.x[torch.randperm(n)[: cfg.num_pseudo_inputs]], "sigmoid"
    prior = VampPrior(guide, init, bounded=bounded, learn_weights=cfg.learn_mixture_weights, link=link)
    return _vae(data, cfg, likelihood, prior, guide)


@register("vae-exemplar", "exemplar prior: 1/(N-1) sum_{m != n} r(z|x_m) over training points (Norouzi et al. 2020)")
def vae_exemplar(data: Dataset, cfg: ModelConfig, likelihood: str) -> Pair:
    guide = _encoder(data, cfg)
    if cfg.exemplar_path not in ("auto", "exact", "scalable"):
        raise ValueError(f"model.exemplar_path = {cfg.exemplar_path!r} is unknown; choose auto, exact or scalable")
    path = cfg.exemplar_path
    if path == "auto":
        path = "exact" if len(data.train) <= cfg.exemplar_exact_max else "scalable"
    prior = ExemplarPrior(guide, data.train.x, cfg.exemplar_variance, path, cfg.exemplar_neighbors,
                          cfg.exemplar_subset, cfg.exemplar_refresh_points, drift=cfg.exemplar_drift,
                          drift_batches=cfg.exemplar_drift_batches, components=cfg.exemplar_components,
                          hops=cfg.exemplar_hops, sweeps=cfg.exemplar_sweeps,
                          landmarks=cfg.exemplar_landmarks, keep=cfg.exemplar_keep,
                          clusters=cfg.exemplar_clusters, cluster_draws=cfg.exemplar_cluster_draws,
                          probe=cfg.exemplar_probe, nearest=cfg.exemplar_nearest,
                          # the exact path encodes its components with gradients: nothing to defer
                          gradient=cfg.exemplar_gradient if path == "scalable" else "none")
    return _vae(data, cfg, likelihood, prior, guide)


def _prior_net(data: Dataset, cfg: ModelConfig) -> ConditionalNormalPrior:
    return ConditionalNormalPrior(data.x_dim, cfg.hidden, cfg.latent_dim, cfg.layer)


def _cvae(data: Dataset, cfg: ModelConfig, likelihood: str, prior: nn.Module) -> tuple[ConditionalVAE, nn.Module]:
    decoder = ConditionalMLPDecoder(data.x_dim, cfg.latent_dim, cfg.hidden[::-1], data.y_dim, cfg.layer)
    model = ConditionalVAE(prior, decoder, make_likelihood(likelihood, data.y_dim))
    return model, ConditionalAmortizedNormalGuide(data.x_dim, data.y_dim, cfg.hidden, cfg.latent_dim, cfg.layer)


@register("cvae", "Sohn et al. CVAE: prior net p(z|x), recognition q(z|x,y), generation p(y|x,z)", True)
def cvae(data: Dataset, cfg: ModelConfig, likelihood: str) -> Pair:
    prior = _prior_net(data, cfg)
    return Pair(*_cvae(data, cfg, likelihood, prior), conditional=True)


@register("cvae-independent-prior", "CVAE with p(z|x) = p(z) = N(0, I) (Sohn's relaxation)", True)
def cvae_independent_prior(data: Dataset, cfg: ModelConfig, likelihood: str) -> Pair:
    return Pair(*_cvae(data, cfg, likelihood, StandardNormalPrior(cfg.latent_dim)), conditional=True)


@register("gsnn", "GSNN: p(y|x,z) trained with z ~ p(z|x) from the prior net (no recognition net)", True)
def gsnn(data: Dataset, cfg: ModelConfig, likelihood: str) -> Pair:
    model, _ = _cvae(data, cfg, likelihood, _prior_net(data, cfg))
    return Pair(model, PriorNetGuide(model.prior), conditional=True)


@register("cvae-hybrid", "alpha * CVAE + (1 - alpha) * GSNN objective (Sohn et al. section 4.2)", True)
def cvae_hybrid(data: Dataset, cfg: ModelConfig, likelihood: str) -> Pair:
    model, guide = _cvae(data, cfg, likelihood, _prior_net(data, cfg))
    return HybridPair(model, guide, conditional=True, alpha=cfg.hybrid_alpha, prior_guide=PriorNetGuide(model.prior))


ENTRY_POINT_GROUP = "vae_priors.pairs"  # an installed package's pairs: [options.entry_points] vae_priors.pairs = ...


def import_pairs(modules: Iterable[str] = ()) -> list[str]:
    """Import the modules that ``@register`` a user's pairs, and every installed ``vae_priors.pairs`` entry point.

    A module is found on ``sys.path`` as usual, or else in the current directory (so ``--import mypairs`` finds
    ``./mypairs.py`` from the console script too). Importing twice is harmless: Python caches modules.
    Returns the modules imported.
    """
    done = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        ep.load()
        done.append(ep.value.split(":")[0])
    for name in modules:
        if not _import_user_module(name):
            raise ModuleNotFoundError(f"cannot import {name!r} (named by --import or the config's imports): no such "
                                      "module on sys.path or in the current directory; run from the folder that "
                                      "holds it, or install it", name=name)
        done.append(name)
    return done


def _import_user_module(name: str) -> bool:
    """Import ``name``; False if the module itself (not something it imports) is not found."""
    for retry in (False, True):
        try:
            importlib.import_module(name)
            return True
        except ModuleNotFoundError as err:
            if err.name != name.split(".")[0]:
                raise  # the user's module was found; something it imports is missing
            if retry or os.getcwd() in sys.path:
                return False
            sys.path.append(os.getcwd())  # appended: the user's folder never shadows an installed package
    return False
