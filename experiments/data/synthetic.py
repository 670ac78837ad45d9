"""Synthetic data with known parameters: linear-Gaussian models whose log p(x), posteriors and aggregated
posteriors are known in closed form (``models.linear_gaussian``), so diagnostics can be checked exactly.
"""

from __future__ import annotations

import torch

from vae_priors.experiments.config import DataConfig
from vae_priors.experiments.data.datasets import Dataset, Split
from vae_priors.models.linear_gaussian import PPCA, ConditionalLinearGaussian, orthogonal_columns


def linear_gaussian_parameters(x_dim: int = 8, latent_dim: int = 4, noise: float = 0.5,
                               posterior_variances: list[float] | None = None, seed: int = 0) -> PPCA:
    """PPCA parameters whose W has orthogonal columns, chosen so that the exact posterior variances are
    ``posterior_variances`` (default evenly spaced in [0.5, 0.9]): v_k = sigma^2 / (|w_k|^2 + sigma^2)."""
    variances = torch.linspace(0.5, 0.9, latent_dim) if posterior_variances is None else \
        torch.tensor(posterior_variances, dtype=torch.float64)
    if variances.shape != (latent_dim,) or not ((variances > 0) & (variances < 1)).all():
        raise ValueError(f"posterior_variances must be {latent_dim} numbers in (0, 1), got {posterior_variances}")
    norms = (noise**2 * (1 / variances.double() - 1)).sqrt()
    weight = orthogonal_columns(x_dim, latent_dim, norms, seed)
    bias = torch.randn(x_dim, generator=torch.Generator().manual_seed(seed + 1))
    return PPCA(weight, bias, noise)


def _match_moments(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """Affinely map the rows of x so their mean and (1/N) covariance are exactly ``mean`` and ``cov``."""
    x = x.double()
    centred = x - x.mean(0)
    sample_chol = torch.linalg.cholesky(centred.T @ centred / x.shape[0])
    white = torch.linalg.solve_triangular(sample_chol, centred.T, upper=False).T
    return (mean.double() + white @ torch.linalg.cholesky(cov.double()).T).float()


def sample_ppca(ppca: PPCA, num: int, seed: int = 0, exact_moments: bool = False) -> torch.Tensor:
    """``num`` draws x = W z + b + sigma eps; with ``exact_moments`` their sample mean and covariance are b and C."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(num, ppca.latent_dim, generator=g)
    x = z @ ppca.weight.T + ppca.bias + ppca.sigma * torch.randn(num, ppca.x_dim, generator=g)
    if exact_moments:
        if num <= ppca.x_dim:
            raise ValueError(f"exact_moments needs more points ({num}) than dimensions ({ppca.x_dim})")
        x = _match_moments(x, ppca.bias, ppca.marginal_covariance())
    return x


def linear_gaussian_dataset(ppca: PPCA | None = None, num_train: int = 2000, num_val: int = 500,
                            num_test: int = 500, exact_moments: bool = False, seed: int = 0) -> Dataset:
    """Train / val / test draws from a PPCA model (default ``linear_gaussian_parameters()``).

    ``exact_moments`` makes each split's first two sample moments equal the population's, so the Gaussian
    aggregated posterior of ``PPCA.aggregate_closed_form`` holds for the split without sampling error.
    """
    ppca = linear_gaussian_parameters() if ppca is None else ppca
    sizes = (num_train, num_val, num_test)
    splits = [Split(sample_ppca(ppca, n, seed + k, exact_moments)) for k, n in enumerate(sizes)]
    return Dataset("linear-gaussian", *splits)


def load_linear_gaussian(cfg: DataConfig) -> Dataset:
    """The ``"linear-gaussian"`` entry of ``vae_priors.experiments.data.formats.LOADERS`` (real-valued x, no files)."""
    if cfg.binarize != "none" or cfg.likelihood != "gaussian":
        raise ValueError("linear-gaussian data are real-valued: set data.binarize = \"none\" and "
                         "data.likelihood = \"gaussian\"")
    return linear_gaussian_dataset()


def conditional_linear_gaussian_parameters(x_dim: int = 4, latent_dim: int = 3, y_dim: int = 5, noise: float = 0.5,
                                           seed: int = 0) -> ConditionalLinearGaussian:
    """Random parameters of z | x ~ N(F x + c, diag tau^2), y | x, z ~ N(B z + E x + d, noise^2 I)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, s=1.0: s * torch.randn(*shape, generator=g)  # noqa: E731
    tau = 0.5 + torch.rand(latent_dim, generator=g)
    return ConditionalLinearGaussian(r(latent_dim, x_dim, s=0.5), r(latent_dim, s=0.3), tau, r(y_dim, latent_dim),
                                     r(y_dim, x_dim, s=0.5), r(y_dim), noise)


def sample_conditional(params: ConditionalLinearGaussian, num: int, seed: int = 0) -> Split:
    """``num`` points x ~ N(0, I), z ~ p(z|x), y ~ p(y|x,z)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num, params.f_matrix.shape[1], generator=g)
    z = params.prior_loc(x) + params.tau * torch.randn(num, params.tau.shape[0], generator=g)
    loc = z @ params.b_matrix.T + x @ params.e_matrix.T + params.bias
    return Split(x, loc + params.sigma * torch.randn(loc.shape, generator=g))
