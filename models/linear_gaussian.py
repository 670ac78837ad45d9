"""Linear-Gaussian pairs with exact answers: the closed forms the diagnostics are tested against.

Probabilistic PCA (Tipping & Bishop 1999)::

    z ~ N(0, I_K),   x | z ~ N(W z + b, sigma^2 I_D)
    p(x)     = N(b, C),  C = W W^T + sigma^2 I
    p(z | x) = N(A (x - b), Sigma),  A = M^{-1} W^T,  Sigma = sigma^2 M^{-1},  M = W^T W + sigma^2 I

With orthogonal columns of W, M is diagonal and so is the exact posterior. For a Gaussian guide
q(z|x) = N(A (x - b), S) and data with mean b and covariance C, the aggregated posterior
q_agg(z) = E_x q(z|x) is Gaussian, N(0, A C A^T + S) (population limit; see ``aggregate_closed_form``).

The conditional pair (x -> z -> y)::

    z | x ~ N(F x + c, diag tau^2),   y | x, z ~ N(B z + E x + d, sigma^2 I)
    p(y | x) = N(B (F x + c) + E x + d, B diag(tau^2) B^T + sigma^2 I)

Both models are the project's own ``VAE`` / ``ConditionalVAE`` with linear parts, so they follow the contract.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from vae_priors.models.cvae import ConditionalVAE
from vae_priors.models.plate import data_plate
from vae_priors.models.priors import StandardNormalPrior
from vae_priors.models.vae import VAE


class FixedNoiseGaussian(nn.Module):
    """Likelihood N(loc, sigma^2 I) with a known, fixed sigma."""

    def __init__(self, sigma: float):
        super().__init__()
        self.sigma = float(sigma)

    def forward(self, loc: torch.Tensor) -> dist.Distribution:
        return dist.Normal(loc, torch.full_like(loc, self.sigma)).to_event(1)


class LinearDecoder(nn.Module):
    """z -> W z + b."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.weight.T + self.bias


class ConditionalLinearDecoder(nn.Module):
    """(x, z) -> B z + E x + d."""

    def __init__(self, b_matrix: torch.Tensor, e_matrix: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.register_buffer("b_matrix", b_matrix)
        self.register_buffer("e_matrix", e_matrix)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return z @ self.b_matrix.T + x @ self.e_matrix.T + self.bias


class LinearGaussianPrior(nn.Module):
    """p(z | x) = N(F x + c, diag tau^2)."""

    def __init__(self, f_matrix: torch.Tensor, offset: torch.Tensor, tau: torch.Tensor):
        super().__init__()
        self.register_buffer("f_matrix", f_matrix)
        self.register_buffer("offset", offset)
        self.register_buffer("tau", tau)

    def forward(self, x: torch.Tensor) -> dist.Distribution:
        loc = x @ self.f_matrix.T + self.offset
        return dist.Normal(loc, self.tau.expand_as(loc)).to_event(1)


def _gaussian_guide_distribution(loc: torch.Tensor, cov: torch.Tensor, scale_factor: float) -> dist.Distribution:
    """N(loc, scale_factor^2 cov): a diagonal Normal when cov is diagonal (so KL per dimension exists)."""
    if torch.allclose(cov, torch.diag(torch.diagonal(cov)), atol=1e-6 * float(cov.abs().max())):
        scale = scale_factor * torch.diagonal(cov).sqrt()
        return dist.Normal(loc, scale.expand_as(loc)).to_event(1)
    return dist.MultivariateNormal(loc, scale_tril=scale_factor * torch.linalg.cholesky(cov))


class PPCA:
    """Parameters (W, b, sigma) of probabilistic PCA and its closed forms."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, sigma: float):
        if weight.ndim != 2 or bias.shape != weight.shape[:1]:
            raise ValueError(f"W must be (D, K) and b (D,); got {tuple(weight.shape)} and {tuple(bias.shape)}")
        self.weight, self.bias, self.sigma = weight, bias, float(sigma)

    @property
    def x_dim(self) -> int:
        return self.weight.shape[0]

    @property
    def latent_dim(self) -> int:
        return self.weight.shape[1]

    def marginal_covariance(self) -> torch.Tensor:
        return self.weight @ self.weight.T + self.sigma**2 * torch.eye(self.x_dim, dtype=self.weight.dtype)

    def log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log p(x_n), shape (N,), computed in float64."""
        cov = self.marginal_covariance().double()
        return dist.MultivariateNormal(self.bias.double(), covariance_matrix=cov).log_prob(x.double())

    def posterior_parameters(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, Sigma): p(z|x) = N(A (x - b), Sigma)."""
        m = self.weight.T @ self.weight + self.sigma**2 * torch.eye(self.latent_dim, dtype=self.weight.dtype)
        m_inv = torch.linalg.inv(m)
        return m_inv @ self.weight.T, self.sigma**2 * m_inv

    def posterior_loc(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.bias) @ self.posterior_parameters()[0].T

    def model(self) -> VAE:
        """The pair's model: the project's ``VAE`` with p(z) = N(0, I), a linear decoder and fixed noise."""
        return VAE(StandardNormalPrior(self.latent_dim), LinearDecoder(self.weight, self.bias),
                   FixedNoiseGaussian(self.sigma))

    def aggregate_closed_form(self, scale_factor: float = 1.0, data_mean: torch.Tensor | None = None,
                              data_cov: torch.Tensor | None = None) -> dict[str, float]:
        """Mean KL, KL(q_agg || p) and I(x; z) for the guide ``ExactPosteriorGuide(self, scale_factor)``.

        q(z|x) = N(A (x - b), S) with S = scale_factor^2 Sigma. Over data with mean m and covariance C_data
        (default: the population, m = b, C_data = C) the means mu_n = A (x_n - b) have mean mu = A (m - b) and
        covariance A C_data A^T; the Gaussian aggregated posterior is N(mu, Sigma_agg), Sigma_agg = A C_data A^T + S:

            mean KL        = 1/2 (tr S + tr A C_data A^T + |mu|^2 - K - log det S)
            KL(q_agg || p) = 1/2 (tr Sigma_agg + |mu|^2 - K - log det Sigma_agg)
            I(x; z)        = mean KL - KL(q_agg || p) = 1/2 (log det Sigma_agg - log det S)

        For N data points q_agg is really the N-component mixture; its KL to p exceeds the Gaussian one by
        KL(mixture || moment-matched Gaussian) >= 0, which vanishes as N grows when components overlap.
        Pass the data set's own first two moments (1/N normalisation) to remove sampling error in them.
        """
        a, sigma_post = (t.double() for t in self.posterior_parameters())
        mean = torch.zeros(self.x_dim, dtype=torch.float64) if data_mean is None else data_mean.double() - self.bias
        cov = self.marginal_covariance().double() if data_cov is None else data_cov.double()
        s = scale_factor**2 * sigma_post
        spread = a @ cov @ a.T
        mu = a @ mean
        k = self.latent_dim
        mean_kl = 0.5 * (torch.trace(s) + torch.trace(spread) + mu @ mu - k - torch.logdet(s))
        agg = spread + s
        kl_agg = 0.5 * (torch.trace(agg) + mu @ mu - k - torch.logdet(agg))
        info = 0.5 * (torch.logdet(agg) - torch.logdet(s))
        return {"mean_kl": float(mean_kl), "kl_qagg_p": float(kl_agg), "mutual_info": float(info)}


class ExactPosteriorGuide(nn.Module):
    """q(z|x) = N(A (x - b), scale_factor^2 Sigma): the exact posterior of a ``PPCA`` when ``scale_factor == 1``.

    ``scale_factor < 1`` gives a too-narrow guide (heavy-tailed importance weights, Pareto k = 1 - factor^2 in
    every direction); ``> 1`` a too-wide one.
    """

    amortized = True

    def __init__(self, ppca: PPCA, scale_factor: float = 1.0):
        super().__init__()
        if scale_factor <= 0:
            raise ValueError(f"scale_factor must be positive, got {scale_factor}")
        a, cov = ppca.posterior_parameters()
        self.register_buffer("a", a)
        self.register_buffer("cov", cov)
        self.register_buffer("bias", ppca.bias)
        self.scale_factor = float(scale_factor)
        self.latent_dim = ppca.latent_dim

    def encode(self, x: torch.Tensor) -> dist.Distribution:
        return _gaussian_guide_distribution((x - self.bias) @ self.a.T, self.cov, self.scale_factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with data_plate(x.shape[0], x.device):
            return pyro.sample("z", self.encode(x))


class ConditionalLinearGaussian:
    """Parameters of the conditional pair x -> z -> y and its closed forms."""

    def __init__(self, f_matrix: torch.Tensor, offset: torch.Tensor, tau: torch.Tensor, b_matrix: torch.Tensor,
                 e_matrix: torch.Tensor, bias: torch.Tensor, sigma: float):
        self.f_matrix, self.offset, self.tau = f_matrix, offset, tau
        self.b_matrix, self.e_matrix, self.bias, self.sigma = b_matrix, e_matrix, bias, float(sigma)

    def model(self) -> ConditionalVAE:
        return ConditionalVAE(LinearGaussianPrior(self.f_matrix, self.offset, self.tau),
                              ConditionalLinearDecoder(self.b_matrix, self.e_matrix, self.bias),
                              FixedNoiseGaussian(self.sigma))

    def prior_loc(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.f_matrix.to(x.dtype).T + self.offset.to(x.dtype)

    def log_conditional(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Exact log p(y_n | x_n), shape (N,), in float64."""
        b, tau = self.b_matrix.double(), self.tau.double()
        loc = self.prior_loc(x.double()) @ b.T + x.double() @ self.e_matrix.double().T + self.bias.double()
        cov = b @ torch.diag(tau**2) @ b.T + self.sigma**2 * torch.eye(b.shape[0], dtype=torch.float64)
        return dist.MultivariateNormal(loc, covariance_matrix=cov).log_prob(y.double())

    def kl_prior_standard(self, x: torch.Tensor) -> torch.Tensor:
        """KL(p(z|x_n) || N(0, I)) = 1/2 sum_k (tau_k^2 + m_k^2 - 1 - log tau_k^2), shape (N,)."""
        m, t2 = self.prior_loc(x.double()), self.tau.double() ** 2
        return 0.5 * (t2 + m**2 - 1 - t2.log()).sum(-1)


class ExactConditionalGuide(nn.Module):
    """q(z|x,y) = p(z|x,y) of a ``ConditionalLinearGaussian``, with its scale times ``scale_factor``.

    p(z|x,y) = N(Lambda^{-1} (T^{-1} (F x + c) + B^T (y - E x - d) / sigma^2), Lambda^{-1}),
    Lambda = T^{-1} + B^T B / sigma^2, T = diag tau^2.
    """

    amortized = True

    def __init__(self, pair: ConditionalLinearGaussian, scale_factor: float = 1.0):
        super().__init__()
        precision = torch.diag(pair.tau**-2) + pair.b_matrix.T @ pair.b_matrix / pair.sigma**2
        self.register_buffer("cov", torch.linalg.inv(precision))
        self.register_buffer("f_matrix", pair.f_matrix)
        self.register_buffer("offset", pair.offset)
        self.register_buffer("tau", pair.tau)
        self.register_buffer("b_matrix", pair.b_matrix)
        self.register_buffer("e_matrix", pair.e_matrix)
        self.register_buffer("bias", pair.bias)
        self.sigma = pair.sigma
        self.scale_factor = float(scale_factor)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if y is None:
            raise ValueError("q(z|x,y) needs y")
        prior_term = (x @ self.f_matrix.T + self.offset) / self.tau**2
        data_term = (y - x @ self.e_matrix.T - self.bias) @ self.b_matrix / self.sigma**2
        loc = (prior_term + data_term) @ self.cov.T
        with data_plate(x.shape[0], x.device):
            return pyro.sample("z", _gaussian_guide_distribution(loc, self.cov, self.scale_factor))


def orthogonal_columns(rows: int, cols: int, norms: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A (rows, cols) matrix with orthogonal columns of the given norms (so W^T W = diag(norms^2))."""
    if cols > rows:
        raise ValueError(f"need rows >= cols for orthogonal columns, got {rows} x {cols}")
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64))
    return (q * norms.double()).float()


__all__ = ["PPCA", "ConditionalLinearGaussian", "ExactPosteriorGuide", "ExactConditionalGuide", "orthogonal_columns"]
