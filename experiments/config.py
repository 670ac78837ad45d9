"""Typed run settings that round-trip through TOML (stdlib ``tomllib`` to read, ``tomli_w`` to write).

Every section is a dataclass; an unknown key anywhere is an error that names it and lists the known ones.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w


class ConfigError(ValueError):
    """A configuration file or value that cannot be used; the message says what to change."""


@dataclass
class DataConfig:
    name: str = "digits"  # digits | mnist | fashion-mnist | binarized-mnist | linear-gaussian
    path: str = ""  # directory with the data files (not used for the embedded digits)
    binarize: str = "static"  # none | static | dynamic
    likelihood: str = "bernoulli"  # bernoulli | gaussian
    quadrants: int = 1  # visible quadrants (x) for conditional pairs; the rest is y
    max_train: int = 0  # use only the first max_train training points (0 = all)


@dataclass
class ModelConfig:
    latent_dim: int = 8
    hidden: list[int] = field(default_factory=lambda: [128, 128])
    layer: str = "relu"  # relu | gated (the VampPrior reference code's gated dense layers, He init, clamped log-var)
    hybrid_alpha: float = 0.5  # cvae-hybrid: alpha * CVAE + (1 - alpha) * GSNN
    num_pseudo_inputs: int = 500  # vae-vamp: K pseudo-inputs
    learn_mixture_weights: bool = False  # vae-vamp: learned mixture logits instead of uniform weights
    pseudo_inputs: str = "data"  # vae-vamp: data (sigmoid, from training points) | reference (hardtanh, N(0.05, .01))
    exemplar_variance: str = "encoder"  # vae-exemplar: encoder (aggregated posterior) | shared (one learned s)
    exemplar_path: str = "auto"  # vae-exemplar: exact | scalable | auto (scalable above exemplar_exact_max points)
    exemplar_exact_max: int = 5000
    exemplar_neighbors: int = 10  # scalable path: k nearest exemplars kept exactly per point
    exemplar_subset: int = 512  # scalable path: random exemplars per step standing for the rest (BENCHMARKS.md)
    exemplar_refresh_points: int = 0  # scalable path: re-encode the cache after this many points (0 = per epoch)
    exemplar_drift: str = "none"  # scalable path: none | affine (carry the cache by a map fitted on fresh batches)
    exemplar_drift_batches: int = 3  # scalable path, affine drift: recent batches the map is fitted on
    exemplar_components: str = "current"  # current (the encoder's, as it moves) | epoch (fixed for each epoch)
    exemplar_hops: int = 1  # scalable path: head = each point's table row (1), and its members' rows too (2)
    exemplar_sweeps: int = 1  # scalable path: most NN-descent sweeps of the table per renewal (until it settles)
    exemplar_landmarks: int = 0  # scalable path: > 0 adds to each head a search of the table around z from as many
    # random landmarks (0: no search)
    exemplar_clusters: int = 0  # scalable path: > 0 adds to the uniform tail draws around z from a k-means partition
    # of the cache into this many clusters (0: uniform tail only)
    exemplar_cluster_draws: int = 256  # scalable path, clusters > 0: draws per point around z (0: none; needs probe)
    exemplar_probe: int = 0  # scalable path, clusters > 0: the head also holds every member of the this many
    # clusters nearest to z (an inverted-file search; 0: none)
    exemplar_nearest: int = 0  # scalable path: > 0 scores exactly only this many of the head's candidates nearest to
    # z, the rest left to the tail (0: all of them)
    exemplar_keep: float = 1.0  # training: each step's prior is over a random share of the exemplars (the Exemplar
    # VAE's exemplar subsampling, a regularizer); 1 = all N. Validation and evaluation always use all N
    exemplar_gradient: str = "none"  # scalable path: none (cached components pass no gradient) | deferred (each
    # exemplar's gradient as a component reaches the encoder at its next visit as a training point)


@dataclass
class SVIConfig:
    objective: str = "trace"  # trace | meanfield | iwae
    num_particles: int = 1  # particles per point (the K of IWAE)
    epochs: int = 200
    batch_size: int = 128
    lr: float = 1e-3
    clip_norm: float = 10.0
    patience: int = 15  # epochs without a better validation ELBO before stopping
    warmup_epochs: int = 0  # KL weight beta rises linearly from 1/warmup to 1 over these epochs
    # Training-time budget per variant, in minutes of its epochs (their "seconds" in history.csv, resumed ones
    # included): training stops after the first epoch that ends past it and keeps the best state. inf = none.
    max_minutes: float = math.inf
    device: str = "cpu"  # cpu | cuda


@dataclass
class EvalConfig:
    num_particles: int = 1000  # importance samples per test point for log p(x)
    local_refit_steps: int = 500  # steps to fit a non-amortized guide on test points, decoder frozen


@dataclass
class RunConfig:
    seed: int = 0
    threads: int = 0  # torch intra-op threads per process; 0 = this process's share of the cores
    variants: list[str] = field(default_factory=list)  # empty = every registered variant
    imports: list[str] = field(default_factory=list)  # the user's modules that register pairs (see registry)
    diagnose: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    svi: SVIConfig = field(default_factory=SVIConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown key {where}{unknown[0]}; known keys here: {', '.join(sorted(known))}")
    kwargs = {}
    for key, value in values.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}{key} must be a table [{where}{key}], got {value!r}")
            kwargs[key] = _build(hint, value, f"{where}{key}.")
            continue
        kwargs[key] = _check_type(value, hint, f"{where}{key}")
    return cls(**kwargs)


def _check_type(value: Any, hint: Any, name: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{name} must be a list of {item.__name__}, got {value!r}")
        return [_check_type(v, item, f"{name}[]") for v in value]
    if origin in (typing.Union, types.UnionType):
        hint = typing.get_args(hint)[0]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{name} must be {hint.__name__}, got {value!r}")
    return value


# Allowed values of the settings that name a choice, and ranges of numbers: checked before any work starts.
CHOICES = {
    ("data", "binarize"): ("none", "static", "dynamic"),
    ("data", "likelihood"): ("bernoulli", "gaussian"),
    ("data", "quadrants"): (1, 2, 3),
    ("model", "layer"): ("relu", "gated"),
    ("model", "pseudo_inputs"): ("data", "reference"),
    ("model", "exemplar_variance"): ("encoder", "shared"),
    ("model", "exemplar_path"): ("auto", "exact", "scalable"),
    ("model", "exemplar_drift"): ("none", "affine"),
    ("model", "exemplar_components"): ("current", "epoch"),
    ("model", "exemplar_hops"): (1, 2),
    ("model", "exemplar_gradient"): ("none", "deferred"),
    ("svi", "objective"): ("trace", "meanfield", "iwae"),
    ("svi", "device"): ("cpu", "cuda"),
}
POSITIVE = [("model", "latent_dim"), ("model", "num_pseudo_inputs"), ("svi", "num_particles"), ("svi", "epochs"),
            ("svi", "batch_size"), ("svi", "lr"), ("svi", "clip_norm"), ("svi", "patience"),
            ("svi", "max_minutes"), ("eval", "num_particles"), ("model", "exemplar_drift_batches"),
            ("model", "exemplar_sweeps")]


def check(config: RunConfig) -> RunConfig:
    """Raise a ``ConfigError`` naming the first setting whose value is not allowed."""
    for (section, key), allowed in CHOICES.items():
        value = getattr(getattr(config, section), key)
        if value not in allowed:
            raise ConfigError(f"{section}.{key} = {value!r} is not allowed; choose one of "
                              f"{', '.join(repr(a) for a in allowed)}")
    for section, key in POSITIVE:
        if not getattr(getattr(config, section), key) > 0:
            raise ConfigError(f"{section}.{key} must be > 0, got {getattr(getattr(config, section), key)!r}")
    if not config.model.hidden or min(config.model.hidden) <= 0:
        raise ConfigError(f"model.hidden must list positive layer widths, got {config.model.hidden}")
    if not 0.0 <= config.model.hybrid_alpha <= 1.0:
        raise ConfigError(f"model.hybrid_alpha must be in [0, 1], got {config.model.hybrid_alpha}")
    for key in ("warmup_epochs",):
        if getattr(config.svi, key) < 0:
            raise ConfigError(f"svi.{key} must be >= 0, got {getattr(config.svi, key)}")
    if not 0.0 < config.model.exemplar_keep <= 1.0:
        raise ConfigError(f"model.exemplar_keep must be in (0, 1] (the share of exemplars in each training step's "
                          f"prior; 1 keeps all), got {config.model.exemplar_keep}")
    clusters, draws, probe = (config.model.exemplar_clusters, config.model.exemplar_cluster_draws,
                              config.model.exemplar_probe)
    if clusters < 0 or draws < 0 or probe < 0 or (clusters and not (draws or probe)) or (probe and not clusters):
        raise ConfigError(f"model.exemplar_clusters must be >= 0 (0: uniform tail only); with clusters > 0, "
                          f"model.exemplar_cluster_draws >= 1 or model.exemplar_probe >= 1, and probe > 0 needs "
                          f"clusters > 0; got clusters={clusters}, cluster_draws={draws}, probe={probe}")
    if config.model.exemplar_nearest < 0 or (config.model.exemplar_nearest and config.model.exemplar_drift != "none"):
        raise ConfigError(f"model.exemplar_nearest must be >= 0 (0: the whole head scored exactly) and needs "
                          f"model.exemplar_drift = 'none'; got {config.model.exemplar_nearest} with drift "
                          f"{config.model.exemplar_drift!r}")
    if config.model.exemplar_landmarks < 0:
        raise ConfigError(f"model.exemplar_landmarks must be >= 0 (0: no search around z), got "
                          f"{config.model.exemplar_landmarks}")
    if config.data.likelihood == "gaussian" and config.data.binarize != "none":
        raise ConfigError(f"data.likelihood = 'gaussian' with data.binarize = {config.data.binarize!r} would fit a "
                          "Gaussian to 0/1 pixels; set data.binarize = 'none' to model grey values with a Gaussian, "
                          "or use data.likelihood = 'bernoulli' for binary data")
    if not math.isfinite(config.svi.lr):  # clip_norm = inf stays allowed: it means "no clipping"
        raise ConfigError(f"svi.lr must be a finite number > 0, got {config.svi.lr!r}")
    if config.seed < 0:
        raise ConfigError(f"seed must be >= 0 (torch seeds are unsigned), got {config.seed}")
    if config.threads < 0:
        raise ConfigError(f"threads must be >= 0 (0 = this process's share of the cores), got {config.threads}")
    if config.data.max_train < 0 or config.eval.local_refit_steps < 0:
        raise ConfigError("data.max_train and eval.local_refit_steps must be >= 0")
    return config


def from_dict(values: dict[str, Any]) -> RunConfig:
    """A ``RunConfig`` from nested dicts (the parsed TOML); unknown keys, wrong types and values are errors."""
    return check(_build(RunConfig, values, ""))


def load(path: str | Path) -> RunConfig:
    """Read a TOML config; every key is optional and defaults to the quick start's value."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config {path} is a directory; pass the path of a .toml file (a run directory's "
                          "config.toml, or one of experiments/configs/*.toml)")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass the path of a .toml file")
    try:
        values = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not UTF-8 text (byte {err.start} cannot be decoded); a config must be a TOML "
                          "text file saved as UTF-8") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path} is not valid TOML: {err}") from None
    try:
        return from_dict(values)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def dumps(config: RunConfig) -> str:
    """The resolved config as TOML text (round-trips through :func:`from_dict`)."""
    return tomli_w.dumps(dataclasses.asdict(config))
