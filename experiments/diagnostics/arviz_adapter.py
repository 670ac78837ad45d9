"""Every ArviZ call of the project, so that the move to ArviZ 1.x touches this one file.

Facts checked on this machine: shared/notes/arviz-0.23.md.


* ``psis``: Pareto-smoothed importance sampling per data point (Yao et al. 2018), samples on the LAST axis, float64.
* ``to_inference_data`` / ``write_netcdf``: VI draws as InferenceData (``az.from_dict``; ``az.from_pyro`` takes MCMC
  only), with the aggregated draws (q_agg vs p(z)) in their own groups.
* ``elpd_data`` / ``compare`` / ``plot_compare`` / ``plot_khat``: model comparison on the PSIS-smoothed importance-
  sampled log p(x_n). Never ``az.loo`` on draws from q: that is a harmonic-mean-type estimate which ranks a
  too-narrow guide best. What is compared is a held-out marginal log-likelihood, not leave-one-out.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from vae_priors.experiments.files import FileFormatError, atomic_path

warnings.filterwarnings("ignore", message=r"\s*ArviZ is undergoing a major refactor", category=FutureWarning)
import arviz as az  # noqa: E402

ELPD_SCALE = "log"
FLAT_SPREAD = 1e-4  # nats


def khat_threshold(num_samples: int) -> float:
    """Good-k threshold of Vehtari et al. (2024): min(1 - 1 / log10 S, 0.7)."""
    return min(1.0 - 1.0 / np.log10(num_samples), 0.7)


def psis(log_w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(smoothed log weights (N, S), k-hat (N,)) for log weights ``log_w`` of shape (N, S): points x samples.

    Weights are cast to float64 (float32 heavy tails change k-hat) and not normalised, so
    ``logsumexp(smoothed, -1) - log S`` is the PSIS estimate of log p(x_n).
    """
    log_w = np.asarray(log_w, dtype=np.float64)
    if log_w.ndim != 2:
        raise ValueError(f"log_w must be (num_points, num_samples), got shape {log_w.shape}")
    if log_w.shape[1] < 10:
        raise ValueError(f"log_w has {log_w.shape[1]} samples per point on its last axis; PSIS needs many (e.g. 1000) "
                         "-- did you pass (num_samples, num_points)? transpose it")
    smoothed, khat = az.psislw(log_w, reff=1.0, normalize=False)
    smoothed, khat = np.array(smoothed), np.array(khat)
    # Weights equal to float precision (an exact proposal) have no tail, but psislw fits rounding noise and can
    # report k = inf. A spread below FLAT_SPREAD nats bounds every weight ratio by 1.0001: report k = -inf.
    flat = np.ptp(log_w, axis=1) < FLAT_SPREAD
    smoothed[flat], khat[flat] = log_w[flat], -np.inf
    return smoothed, khat


def _chain(a) -> np.ndarray:
    """Add the leading chain axis of length 1 that ArviZ expects for draws."""
    return np.asarray(a)[None, ...]


IMPORTANCE_GROUP = "importance_weights"  # not "log_likelihood": see to_inference_data
HELD_OUT_GROUP = "held_out"


def to_inference_data(z_posterior: np.ndarray, z_prior: np.ndarray, log_lik: np.ndarray, log_w: np.ndarray,
                      log_q: np.ndarray, log_p_z: np.ndarray, observed: np.ndarray, obs_index: np.ndarray,
                      q_agg_draws: np.ndarray | None = None, prior_agg_draws: np.ndarray | None = None,
                      observed_name: str = "x", held_out: dict[str, np.ndarray] | None = None,
                      constant: np.ndarray | None = None, attrs: dict[str, str] | None = None) -> az.InferenceData:
    """InferenceData for a subset of n points with S draws each, and per-point results for every test point.

    Groups: ``posterior`` z ~ q(z|x_n) and ``prior`` (the model's "z" for the same points); ``importance_weights``
    log p(x_n|z_s) (``log_lik_given_z``), log q, log p(z) and log w (draws x points); ``held_out`` (dim
    ``test_point``) the PSIS-smoothed importance-sampled log p(x_n), its k-hat and the plain IS estimate for ALL
    test points; ``observed_data``; ``constant_data`` (a conditional pair's visible input x); ``aggregated_*``.

    There is deliberately no ``log_likelihood`` group: log p(x_n|z_s) at draws from q is not a posterior predictive
    log-likelihood, and ``az.loo`` on it is a harmonic-mean-type estimate that ranks a too-narrow guide best. So
    ``az.loo``/``az.compare``/``az.plot_khat`` on the file refuse (no log_likelihood); ``elpd_from_inference_data``
    gives them the right input (the held-out estimate with its k-hat).

    :param z_posterior: (S, n, D) draws z ~ q(z|x_n); ``z_prior`` (S, n, D) draws from the model's "z" site.
    :param log_lik: (S, n) log p(x_n|z_s) (or log p(y_n|x_n,z_s)); ``log_w``, ``log_q``, ``log_p_z`` (S, n).
    :param observed: (n, width) the observed values; ``obs_index`` (n,) their positions in the split.
    :param held_out: per test point (N,): ``log_lik_psis``, ``khat`` and optionally ``log_lik_is``, ``elbo``.
    :param constant: (n, width_x) the conditioning input of the n points (conditional pairs).
    :param attrs: file attributes (variant, data set, ...); the inference library and versions are added.
    """
    s, n, d = np.shape(z_posterior)
    obs, latent = np.asarray(obs_index), np.arange(d)
    coords = {"obs": obs, "latent": latent}
    draws = {"chain": [0], "draw": np.arange(s)}
    idata = az.from_dict(posterior={"z": _chain(z_posterior)}, coords=coords, dims={"z": ["obs", "latent"]})
    per_draw = (("chain", "draw", "obs"), coords | draws)
    weights = xr.Dataset({name: (per_draw[0], _chain(values)) for name, values in
                          (("log_lik_given_z", log_lik), ("log_q", log_q), ("log_p_z", log_p_z), ("log_w", log_w))},
                         coords={"chain": [0], "draw": np.arange(s), "obs": obs})
    weights.attrs["meaning"] = ("importance sampling with proposal q(z|x): log_w = log_lik_given_z + log_p_z - log_q; "
                                "log p(x_n) ~= logsumexp_s log_w - log S. Not a log_likelihood group for az.loo.")
    observed_coords = {"obs": obs, "feature": np.arange(np.shape(observed)[1])}
    extra = {IMPORTANCE_GROUP: weights,
             "observed_data": xr.Dataset({observed_name: (("obs", "feature"), np.asarray(observed))},
                                         coords=observed_coords),
             "prior": xr.Dataset({"z": (("chain", "draw", "obs", "latent"), _chain(z_prior))}, coords=coords | draws)}
    if held_out is not None:
        n_all = len(np.asarray(held_out["log_lik_psis"]))
        extra[HELD_OUT_GROUP] = xr.Dataset({k: (("test_point",), np.asarray(v, dtype=np.float64))
                                            for k, v in held_out.items()}, coords={"test_point": np.arange(n_all)})
        extra[HELD_OUT_GROUP].attrs["meaning"] = ("per test point: log_lik_psis = PSIS-smoothed importance-sampled "
                                                  "log p(x_n) (or log p(y_n|x_n)), khat its Pareto k-hat")
    if constant is not None:
        extra["constant_data"] = xr.Dataset({"x": (("obs", "x_feature"), np.asarray(constant))},
                                            coords={"obs": obs, "x_feature": np.arange(np.shape(constant)[1])})
    for group, agg in (("aggregated_posterior", q_agg_draws), ("aggregated_prior", prior_agg_draws)):
        if agg is not None:
            extra[group] = xr.Dataset({"z": (("chain", "draw", "latent"), _chain(agg))},
                                      coords={"chain": [0], "draw": np.arange(len(agg)), "latent": np.arange(d)})
    idata.add_groups(extra)
    for group in idata.groups():  # on every group (InferenceData-level attrs do not survive h5netcdf)
        idata[group].attrs.update(_attrs(attrs))
    return idata


def _attrs(attrs: dict[str, str] | None) -> dict[str, str]:
    import pyro
    import torch

    values = {**(attrs or {}), "inference_library": "pyro", "inference_library_version": pyro.__version__,
              "torch_version": torch.__version__, "inference": "variational (SVI); draws are from the guide q(z|x)"}
    return {k: str.__str__(str(v)) for k, v in values.items()}  # plain str: h5netcdf rejects str subclasses


def elpd_from_inference_data(idata: az.InferenceData, num_samples: int) -> az.ELPDData:
    """The ``ELPDData`` of a stored file's ``held_out`` group: what ``az.compare`` and ``az.plot_khat`` need."""
    if HELD_OUT_GROUP not in idata.groups():
        raise ValueError(f"this InferenceData has no {HELD_OUT_GROUP!r} group; rerun `vae-priors diagnose RUN_DIR "
                         "--overwrite` to write one")
    group = idata[HELD_OUT_GROUP]
    return elpd_data(group["log_lik_psis"].values, group["khat"].values, num_samples)


def write_netcdf(idata: az.InferenceData, path: str | Path) -> Path:
    """Write ``idata`` to ``path`` through a temporary file and a rename: never half a file."""
    with atomic_path(path) as tmp:
        idata.to_netcdf(str(tmp))
    return Path(path)


def read_netcdf(path: str | Path) -> az.InferenceData:
    """A ``diagnostics/NAME.nc`` file; an empty, truncated or foreign file is a ``FileFormatError`` naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; `vae-priors diagnose RUN_DIR` writes it")
    try:
        return az.from_netcdf(path)
    except PermissionError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise FileFormatError(f"cannot read {path} as NetCDF ({type(err).__name__}); it is truncated or not a "
                              "diagnostics file -- rerun `vae-priors diagnose RUN_DIR --overwrite`") from None


def elpd_data(log_lik_psis: np.ndarray, khat: np.ndarray, num_samples: int = 1000) -> az.ELPDData:
    """An ``ELPDData`` from the PSIS-smoothed importance-sampled log p(x_n) of held-out points and their k-hat.

    elpd = sum_n log p(x_n), se = sqrt(N Var_n log p(x_n)), as ``az.loo`` would compute from ``loo_i``; the label
    "elpd_loo" is what ``az.compare`` expects, but the number is a held-out marginal log-likelihood.
    """
    values = np.asarray(log_lik_psis, dtype=np.float64)
    khat = np.asarray(khat, dtype=np.float64)
    if values.ndim != 1 or values.shape != khat.shape:
        raise ValueError(f"log_lik_psis and khat must be (N,) arrays of one shape, got {values.shape}, {khat.shape}")
    n = values.shape[0]
    good_k = khat_threshold(num_samples)
    return az.ELPDData(
        data=[values.sum(), float(np.sqrt(n * np.var(values))), 0.0, num_samples, n, bool((khat > good_k).any()),
              xr.DataArray(values, dims=["obs"], name="loo_i"), xr.DataArray(khat, dims=["obs"], name="pareto_k"),
              ELPD_SCALE, good_k],
        index=["elpd_loo", "se", "p_loo", "n_samples", "n_data_points", "warning", "loo_i", "pareto_k", "scale",
               "good_k"])


def compare(elpds: dict[str, az.ELPDData]) -> pd.DataFrame:
    """``az.compare`` of several variants' ``elpd_data`` (ranked, with differences and their standard errors)."""
    if len(elpds) < 2:
        raise ValueError(f"compare needs at least two variants, got {list(elpds)}")
    sizes = {name: int(e["n_data_points"]) for name, e in elpds.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"variants were evaluated on different numbers of points {sizes}; use the same test split")
    with _known_arviz_deprecations():
        return az.compare(elpds, ic="loo", scale=ELPD_SCALE)


@contextlib.contextmanager
def _known_arviz_deprecations() -> Iterator[None]:
    """Silence two deprecations inside arviz 0.23 itself (pinned: pandas < 4, matplotlib < 3.13)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*inplace keyword", category=Warning)  # pandas 3.1
        warnings.filterwarnings("ignore", message=r".*alias_mapping", category=Warning)  # matplotlib 3.11
        yield


def plot_compare(comparison: pd.DataFrame, ax):
    """``az.plot_compare`` on ``ax``, titled as what it is."""
    with _known_arviz_deprecations():
        ax = az.plot_compare(comparison, ax=ax, insample_dev=False)
    ax.set_title("held-out log p(x), PSIS-smoothed importance sampling (higher is better)")
    return ax


def plot_khat(elpd: az.ELPDData, ax):
    """``az.plot_khat`` of one variant's per-point Pareto k-hat on ``ax``, with the good-k line."""
    with _known_arviz_deprecations():
        ax = az.plot_khat(elpd, ax=ax, show_hlines=True)
    ax.axhline(float(elpd["good_k"]), color="C3", linestyle="--", linewidth=1)
    return ax
