"""Priors that are mixtures of the guide's own posteriors: the VampPrior and the exemplar prior.

Both are p(z) = sum_k w_k q(z | u_k), with q(z|.) = N(mu(.), diag sigma(.)^2) the amortized guide's encoder
(``AmortizedNormalGuide.encode``), and both appear at the model's ``"z"`` site as a ``GaussianMixture`` (a
``MixtureSameFamily``), so the SVI loop, ``log_weights`` and ``evaluate`` need no special case.

* ``VampPrior`` (Tomczak & Welling 2018): u_k are K learnable pseudo-inputs.
* ``ExemplarPrior`` (Norouzi et al. 2020): u_n are the N training points. In training, the point being scored
  is left out (w_n = 1/(N-1) for the others); at evaluation all N components have w_n = 1/N. With the
  encoder's own variances it is the aggregated posterior q_agg(z) = 1/N sum_n q(z|x_n); with
  ``variance="shared"`` the components are N(mu(x_n), s^2 I) with one learned s, as in the Exemplar VAE.
  It lives in ``models/exemplar_prior.py`` (with its cached estimate for large N) and builds on the common part here.

Memory: the mixtures (``models/mixture_distributions.py``) evaluate their log-density in bounded chunks; no
queries x K x latent tensor is ever formed.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from vae_priors.models.mixture_distributions import DEFAULT_MAX_ELEMENTS, GaussianMixture


class _MixtureOfPosteriors(nn.Module):
    """Common part: the guide's encoder (shared, not copied) and encodings cached by parameter version."""

    def __init__(self, guide: nn.Module, max_elements: int):
        super().__init__()
        if not hasattr(guide, "encode"):
            raise TypeError(f"{type(guide).__name__} has no encode(x); a mixture prior needs an amortized guide "
                            "such as AmortizedNormalGuide")
        self.guide = guide
        self.max_elements = max_elements
        self._cache_key, self._cache = None, None

    def _encode(self, x: torch.Tensor, source: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
        """(loc, scale) of q(z|x) for the rows of ``x``, which is computed from the stored tensor ``source``."""
        if torch.is_grad_enabled():
            posterior = self.guide.encode(x).base_dist
            return posterior.loc, posterior.scale
        # Without gradients (evaluation), reuse the encodings until a parameter or the input changes
        # (optimizer steps and load_state_dict bump tensor versions).
        key = tuple((t.data_ptr(), t._version) for t in (*self.guide.parameters(), source))
        if key != self._cache_key:
            parts = [self.guide.encode(x[i : i + chunk]).base_dist for i in range(0, x.shape[0], chunk)]
            self._cache = torch.cat([p.loc for p in parts]), torch.cat([p.scale for p in parts])
            self._cache_key = key
        return self._cache


class VampPrior(_MixtureOfPosteriors):
    """p(z) = sum_k w_k q(z | u_k) over K learnable pseudo-inputs u_k (Tomczak & Welling 2018, eq. 9).

    For data in [0, 1] (``bounded=True``) the pseudo-inputs stay in the data's range through ``link``:

    * ``"sigmoid"``: u_k = sigmoid(a_k), a_k starting at logit(clip(x_k, 0.01, 0.99)) for the ``init_points``
      (K random training points, say);
    * ``"hardtanh"`` (the reference code's): u_k = Hardtanh(0, 1)(a_k), a_k starting at ``init_points`` as given
      (there: N(0.05, 0.01^2) noise, ``reference_init``).

    Unbounded data: u_k = a_k. Weights are uniform, or softmax of learned logits with ``learn_weights``.
    The index is not used.
    """

    def __init__(self, guide: nn.Module, init_points: torch.Tensor, bounded: bool = True,
                 learn_weights: bool = False, max_elements: int = DEFAULT_MAX_ELEMENTS, link: str = "sigmoid"):
        super().__init__(guide, max_elements)
        if link not in ("sigmoid", "hardtanh"):
            raise ValueError(f"pseudo-input link {link!r} is unknown; choose \"sigmoid\" or \"hardtanh\"")
        self.bounded, self.link = bounded, link
        sigmoid = bounded and link == "sigmoid"
        raw = torch.logit(init_points.clamp(0.01, 0.99)) if sigmoid else init_points.clone()
        self.raw_pseudo_inputs = nn.Parameter(raw)
        logits = torch.zeros(init_points.shape[0])
        self.logits = nn.Parameter(logits) if learn_weights else nn.Buffer(logits)

    @staticmethod
    def reference_init(num: int, dim: int, mean: float = 0.05, std: float = 0.01) -> torch.Tensor:
        """The reference code's starting pseudo-inputs for binary MNIST: (num, dim) draws from N(mean, std^2)."""
        return mean + std * torch.randn(num, dim)

    @property
    def pseudo_inputs(self) -> torch.Tensor:
        if not self.bounded:
            return self.raw_pseudo_inputs
        if self.link == "hardtanh":
            return F.hardtanh(self.raw_pseudo_inputs, 0.0, 1.0)
        return torch.sigmoid(self.raw_pseudo_inputs)

    def forward(self, index: torch.Tensor) -> GaussianMixture:
        loc, scale = self._encode(self.pseudo_inputs, self.raw_pseudo_inputs)
        return GaussianMixture(self.logits.expand(index.shape[0], -1), loc, scale, self.max_elements)
