"""The exemplar prior (Norouzi et al. 2020): a mixture of the guide's posteriors at the N training points.

Exact in small data sets; at MNIST size a cached estimate that follows the exact leave-one-out mixture, and
reports how closely it did (``end_epoch``) into ``history.csv``. The estimate's machinery (cache, neighbour table,
sharing under torch.distributed) is in ``models/exemplar_estimate.py``, its head and tail in
``models/exemplar_head_tail.py``.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.nn import functional as F

from vae_priors.models.exemplar_estimate import ScalableEstimate
from vae_priors.models.mixture_distributions import (
    DEFAULT_MAX_ELEMENTS,
    GaussianMixture,
    HeadTailMixture,
    SearchedHeadTail,
)
from vae_priors.models.mixture_priors import _MixtureOfPosteriors


class ExemplarPrior(ScalableEstimate, _MixtureOfPosteriors):
    """Exemplar prior over the N training points (Norouzi et al. 2020, eq. 4), leave-one-out in training.

    p(z | not n) = 1/(N-1) sum_{m != n} r(z | x_m) when training point n is scored (``index`` = the minibatch's
    training indices, module in training mode); p(z) = 1/N sum_m r(z | x_m) in eval mode. r(z|x_m) is the
    guide's q(z|x_m) (``variance="encoder"``: the mixture is the aggregated posterior) or N(mu(x_m), s^2 I)
    with one learned s (``variance="shared"``, the Exemplar VAE's choice).

    ``path="exact"`` encodes all N exemplars with gradients at every step (cost O(N) encoder passes: for
    small N such as the digits). ``path="scalable"`` (for MNIST-size N) is a stratified estimate from a cache:

    1. cache: (mu_m, sigma_m) of all N exemplars, without gradients, at no encoder cost of its own: each training
       step writes back the encodings the guide has just computed for its batch (so no entry is older than one
       epoch), and ``end_epoch`` (called by ``fit`` after validation, whose exact mixture encodes all N anyway)
       replaces it. ``refresh_points`` > 0 adds a re-encoding after that many points.
    2. head: for each training point n a table of its k nearest exemplars in the cache (Euclidean distance
       between cached means), improved at each renewal by NN-descent sweeps over {its neighbours and reverse
       neighbours, theirs, the k nearest of a random subset} (Dong et al. 2011): up to ``sweeps``, until one renews
       less than a tenth of the table (a young table takes about six, a settled one one), and, with current
       components, after every visit by merging in the k nearest of that step's tail draws (for later visits; the
       step itself uses the old head; ``models/neighbor_table.py``). ``hops=2``: head_n is the row and the rows of
       its members (up to k + k^2 distinct exemplars). ``landmarks`` > 0: the head also holds what a greedy search
       of the table finds around z itself, so the step returns a ``SearchedHeadTail`` that searches in ``log_prob``
       (given z the head is fixed, so step 3 holds as it is; a third less error at 2x the step, BENCHMARKS.md).
       ``clusters`` = C > 0: the tail also takes ``cluster_draws`` draws per point around z from a k-means partition
       of the cache into C clusters, renewed with the table, weighed with the uniform draws by multiple importance
       sampling (``models/exemplar_clusters.py``): still unbiased given the cache, and late in a long run the
       mass near z that the head misses is drawn where a uniform tail rarely reaches it. ``probe`` = t > 0: the
       head also holds every member of the t clusters whose centres are nearest to z (an inverted-file search;
       given z the head is fixed, as with landmarks), with or without the draws (``cluster_draws`` = 0).
       ``nearest`` = K > 0: of all these candidates only the K nearest to z are scored exactly (ranked without
       gradients); the rest join the tail's pool. A choice fixed by z, so step 3 still holds;
    3. the step's mixture for point n (a ``HeadTailMixture``) is  sum_{m in head_n} 1/(N-1) r_m(z)
       + (N-1-|head_n|)/(N-1) * 1/|S_n| sum_{m in S_n} r_m(z),  with S = M i.i.d. uniform draws from 1..N shared by
       the batch and S_n = the draws not equal to n nor in head_n: given |S_n|, those are i.i.d. uniform over
       the other N-1-|head_n| exemplars, so the tail mean is unbiased for theirs. Given the cache it is an unbiased
       estimate of the leave-one-out mixture density (biased low in log space); with M >= N it is exact.

    Per step it costs O(B (k + M) D) and no encoder pass. What it does not remove: the cache's age and the head's
    missed neighbours. ``end_epoch`` measures both against the exact leave-one-out mixture of the current encoder
    at the end of every epoch, when the cache is oldest: the mean |error| in nats per point over ``track_points``
    training points (``prior_error`` in ``history.csv``). On binarized MNIST it is nats, not hundredths (README,
    "Results on MNIST"): early in training the encoder moves too fast for any cache, and the nearest exemplar
    carries about half of the mixture at z, so a missed neighbour costs much. Gradients reach the encoder through
    z and the shared scale, not through the cached exemplars, unless ``gradient="deferred"``: then the loss's
    gradient for each cached location is collected per exemplar and joins the gradient of the guide's encoding of
    that exemplar at its next visit as a training point (``models/exemplar_estimate.py``).

    ``components="epoch"`` makes the cache the prior instead of chasing the encoder: the components are the
    encodings of all N exemplars made at the start of each epoch (the buffers ``component_loc``, ``component_scale``,
    checkpointed with the model), fixed while the epoch trains and validates, and renewed from the then-current
    encoder before the next epoch's first step. The step's estimate is then of this prior's exact leave-one-out
    mixture, with no cache age at all, and validation and evaluation use the same N components exactly.
    ``end_epoch`` reports both the estimate's error against that exact mixture (``prior_error``) and how far the
    epoch's prior is from the mixture over the current encoder, the Exemplar VAE's (``prior_lag``). Like a target
    network, it pins the latent frame for an epoch: the guide's KL is taken against components that do not move.

    ``drift="affine"`` tries to follow the encoder between refreshes with one affine map, because the exemplar
    prior leaves the latent frame free (shifting, rotating or scaling every code, s included, changes nothing the
    ELBO sees). The cache keeps its rows in the frame of the last refresh (the anchor), each step fits
    [mu_anchor, 1] @ W ~ mu_fresh by least squares on the fresh means of the last ``drift_batches`` batches,
    stores this batch's fresh means pulled back into the anchor frame, and the estimate uses the cached means
    carried forward by W. The fit comes after the step's estimate (one semantics with and without DDP).
    It tracked a real MNIST run worse than plain write-back (BENCHMARKS.md section 2), hence not the default.

    ``keep`` < 1 is the Exemplar VAE's exemplar subsampling (a regularizer against memorizing neighbours): each
    training step draws a random subset S of ceil(keep N) exemplars, and point n's prior is 1/|S - {n}| sum_{m in S,
    m != n} r_m(z). On the scalable path head members outside S are dropped and the tail draws from S, so the
    estimate stays unbiased given S. Validation and evaluation (eval mode) use all N.

    Under torch.distributed every rank holds the same cache and table: each step all-gathers the ranks'
    written-back encodings and updated table rows, and the sweeps draw from a generator shared by the ranks.
    Write-back needs a guide whose ``net(x)`` returns (loc, scale) (``AmortizedNormalGuide``); with other
    guides the cache is renewed by ``end_epoch`` and ``refresh_points`` only (it only guides the head's choice).
    """

    def __init__(self, guide: nn.Module, train_x: torch.Tensor, variance: str = "encoder", path: str = "exact",
                 neighbors: int = 10, subset: int = 512, refresh_points: int = 0,
                 max_elements: int = DEFAULT_MAX_ELEMENTS, refine: bool = True, track_points: int = 256,
                 drift: str = "none", drift_batches: int = 3, components: str = "current", hops: int = 1,
                 sweeps: int = 1, landmarks: int = 0, keep: float = 1.0, gradient: str = "none", clusters: int = 0,
                 cluster_draws: int = 256, probe: int = 0, nearest: int = 0):
        super().__init__(guide, max_elements)
        n = train_x.shape[0]
        if variance not in ("encoder", "shared"):
            raise ValueError(f"exemplar variance {variance!r} is unknown; choose \"encoder\" or \"shared\"")
        if path not in ("exact", "scalable"):
            raise ValueError(f"exemplar path {path!r} is unknown; choose \"exact\" or \"scalable\"")
        if n < 2:
            raise ValueError(f"an exemplar prior needs at least 2 training points for leave-one-out, got {n}")
        if drift not in ("none", "affine"):
            raise ValueError(f"exemplar drift {drift!r} is unknown; choose \"none\" or \"affine\"")
        if hops not in (1, 2):
            raise ValueError(f"exemplar head hops must be 1 (each point's table row) or 2 (and its members' rows), "
                             f"got {hops}")
        if components not in ("current", "epoch"):
            raise ValueError(f"exemplar components {components!r} are unknown; choose \"current\" or \"epoch\"")
        if components == "epoch" and (drift != "none" or refresh_points):
            raise ValueError("epoch components are renewed once per epoch and never move in between: use "
                             "drift=\"none\" and refresh_points=0 with them")
        if landmarks < 0 or (landmarks and drift != "none"):
            raise ValueError(f"exemplar landmarks must be >= 0 (0: no search around z) and need drift=\"none\", got "
                             f"{landmarks} with drift={drift!r}")
        if clusters < 0 or cluster_draws < 0 or probe < 0 or (clusters and drift != "none") or (
                clusters and not (cluster_draws or probe)) or (probe and not clusters):
            raise ValueError(f"exemplar clusters must be >= 0 (0: a uniform tail only), and clusters > 0 needs "
                             f"drift=\"none\" and cluster_draws >= 1 or probe >= 1 (probe > 0 needs clusters > 0); got "
                             f"clusters={clusters}, cluster_draws={cluster_draws}, probe={probe}, drift={drift!r}")
        if nearest < 0 or (nearest and drift != "none"):
            raise ValueError(f"exemplar nearest must be >= 0 (0: the whole head scored exactly) and needs "
                             f"drift=\"none\", got {nearest} with drift={drift!r}")
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"exemplar keep must be in (0, 1] (the share of exemplars in each training step's prior; "
                             f"1: all), got {keep}")
        if gradient not in ("none", "deferred") or (gradient == "deferred" and (path, drift) != ("scalable", "none")):
            raise ValueError(f"exemplar gradient {gradient!r} is unknown or unsupported here; choose \"none\", or "
                             f"\"deferred\" with path=\"scalable\" and drift=\"none\" (got {path!r}, {drift!r})")
        if sweeps < 1:
            raise ValueError(f"exemplar sweeps must be >= 1 (most NN-descent sweeps of the table per renewal), got "
                             f"{sweeps}")
        if drift_batches < 1:
            raise ValueError(f"exemplar drift_batches must be >= 1 (recent batches the affine map is fitted on), got "
                             f"{drift_batches}")
        if path == "scalable" and not (1 <= neighbors and neighbors + 2 <= subset <= n):
            raise ValueError(f"the scalable exemplar path needs 1 <= neighbors and neighbors + 2 <= subset <= N; got "
                             f"neighbors={neighbors}, subset={subset}, N={n}: lower them or use path=\"exact\"")
        self.variance, self.path = variance, path
        self.neighbors, self.subset, self.refine = neighbors, subset, refine
        self.refresh_points, self.track_points = refresh_points, min(track_points, n)
        self.register_buffer("train_x", train_x, persistent=False)  # rebuilt from the data, not checkpointed
        if variance == "shared":
            self.raw_shared_scale = nn.Parameter(torch.tensor(math.log(math.e - 1.0)))  # softplus^-1(1)
        self.drift, self.drift_batches, self.components, self.hops = drift, drift_batches, components, hops
        self._loc = self._scale = self._table = self._batch = self._anchor = self._map = None
        self.gradient, self._deferred, self._live = gradient, None, None
        self._pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._seen = self._sweeps = 0
        self.landmarks = min(landmarks, n)
        self.clusters, self.cluster_draws, self._clusters, self._centres = min(clusters, n), cluster_draws, None, None
        self.probe, self.nearest = probe, nearest
        self.kept_size = max(2, math.ceil(keep * n))  # >= 2, so that every n keeps another exemplar
        self.sweeps, self._swept = sweeps, (0, math.nan)  # (sweeps, share of new entries in the last) at the renewal
        self._due = True  # epoch components: renew them before the next training step
        if components == "epoch":  # the prior before any training: the initial encoder's
            loc, scale = self._encode_all()
            self.register_buffer("component_loc", loc.clone())
            self.register_buffer("component_scale", scale.clone())
        encoder = getattr(guide, "net", None)
        if path == "scalable" and (components == "current" or gradient == "deferred"):
            if not isinstance(encoder, nn.Module) and gradient == "deferred":
                raise ValueError("exemplar gradient \"deferred\" needs a guide whose encoder is ``guide.net``, "
                                 "returning (loc, scale) (AmortizedNormalGuide); use gradient=\"none\"")
            if isinstance(encoder, nn.Module):
                encoder.register_forward_hook(self._remember_batch)

    @property
    def num_exemplars(self) -> int:
        return self.train_x.shape[0]

    def _component_scale(self, scale: torch.Tensor) -> torch.Tensor:
        if self.variance == "encoder":
            return scale
        return (F.softplus(self.raw_shared_scale) + 1e-3).expand(scale.shape)

    @torch.no_grad()
    def _encode_all(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The current encoder's (loc, scale) of all N exemplars, without gradients."""
        return self._encode(self.train_x, self.train_x)

    def _components(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The prior's components: this epoch's (``components="epoch"``) or the current encoder's."""
        if self.components == "epoch":
            return self.component_loc, self.component_scale
        return self._encode(self.train_x, self.train_x)

    def mixture(self, index: torch.Tensor | None = None, loc: torch.Tensor | None = None,
                scale: torch.Tensor | None = None, kept: torch.Tensor | None = None) -> GaussianMixture:
        """The exact mixture of the prior's components (or of ``loc``, ``scale``): leave-one-out for training
        indices ``index``, else all N; only the exemplars ``kept`` (an (N,) mask) where given."""
        if loc is None:
            loc, scale = self._components()
        n = self.num_exemplars
        if index is None:
            return GaussianMixture(loc.new_zeros(1, n), loc, self._component_scale(scale), self.max_elements)
        logits = loc.new_zeros(index.shape[0], n)
        if kept is not None:
            logits[:, ~kept] = -math.inf
        logits[torch.arange(index.shape[0], device=index.device), index] = -math.inf
        return GaussianMixture(logits, loc, self._component_scale(scale), self.max_elements)

    def forward(self, index: torch.Tensor) -> GaussianMixture | HeadTailMixture | SearchedHeadTail:
        if not self.training:
            return self.mixture().expand(index.shape[:1])
        if index.numel() and int(index.max()) >= self.num_exemplars:
            raise ValueError(f"in training mode the exemplar prior scores training points (indices < "
                             f"{self.num_exemplars}), got index {int(index.max())}; call .eval() for other points")
        if self.components == "epoch" and self._due:
            self._renew_components()
        kept = self._draw_kept()
        if self.path == "exact":
            return self.mixture(index, kept=None if kept is None else kept[1])
        if self._loc is None or self._loc.device != self.train_x.device or (
                self.refresh_points and self._seen >= self.refresh_points):
            self.refresh()
        self._seen += index.shape[0]
        fresh = self._take_batch(index)
        if self.gradient == "deferred":  # onto this step's encodings of the batch, when they are of these points
            self._pass_deferred(index, fresh is not None)
        if fresh is not None and self.drift == "none" and self.components == "current":
            self._store(index, *fresh)
        # with epoch components a point's next visit comes after the renewal and the sweep: merging this step's
        # draws into its row would cost a search per step for a table the sweep rebuilds (BENCHMARKS.md section 2)
        estimate = self._estimate(index, refine=self.refine and self.components == "current", kept=kept)
        if torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
            self._share_updates(index, fresh)
        elif fresh is not None and self.drift == "affine":  # after the estimate, as under DDP: one semantics
            self._follow(index, *fresh)
        return estimate

    def _draw_kept(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Exemplar subsampling (``keep`` < 1): this step's random subset S of ``kept_size`` exemplars, as (ids in
        random order, (N,) mask); None when the prior keeps all N."""
        n = self.num_exemplars
        if self.kept_size >= n:
            return None
        chosen = torch.randperm(n, device=self.train_x.device)[: self.kept_size]
        return chosen, torch.zeros(n, dtype=torch.bool, device=chosen.device).index_fill_(0, chosen, True)

    @torch.no_grad()
    def _renew_components(self) -> None:
        """``components="epoch"``: this epoch's components are the current encoder's; the cache is rebuilt on them."""
        loc, scale = self._encode_all()
        self.component_loc.copy_(loc)
        self.component_scale.copy_(scale)
        self._due, self._loc = False, None

    @torch.no_grad()
    def end_epoch(self) -> dict[str, float]:
        """Measure the cached estimate against the exact leave-one-out mixture, then renew the cache.

        Called by ``fit`` after each epoch's validation (which, with current components, has just encoded all N
        exemplars: the encodings are reused). Returns ``prior_error`` (mean |estimate - exact| of log p(z | not n),
        nats per point) and ``prior_error_mean`` (its signed mean), for z ~ q(z|x_n) at ``track_points`` random
        training points, with ``table_sweeps`` and ``table_new``: the sweeps of the table at the last renewal and
        the share of its entries the last one renewed; {} on the exact path or before any step. With epoch
        components the exact mixture is this epoch's, and ``prior_lag`` (``prior_lag_mean``) is the mean
        |log p(z | not n)| difference between it and the mixture over the current encoder; the components are
        renewed before the next step, not here, so that the checkpoint holds the prior that was validated.
        """
        self._due = True
        if self.path != "scalable" or self._loc is None:
            return {}
        loc, scale = self._encode_all()
        summary = {}
        if self.track_points:
            rng = torch.Generator(device=loc.device).manual_seed(10_000 + self._sweeps)
            index = torch.randperm(self.num_exemplars, device=loc.device, generator=rng)[: self.track_points]
            z = loc[index] + scale[index] * torch.randn(loc[index].shape, device=loc.device, generator=rng)
            exact = self._exact_log_prob(index, z, *self._components())
            error = self._estimated_log_prob(index, z, rng) - exact
            summary = {"prior_error": error.abs().mean().item(), "prior_error_mean": error.mean().item(),
                       "table_sweeps": self._swept[0], "table_new": self._swept[1]}
            if self.components == "epoch":
                lag = exact - self._exact_log_prob(index, z, loc, scale)
                summary.update(prior_lag=lag.abs().mean().item(), prior_lag_mean=lag.mean().item())
        if self.components == "current":
            self.refresh(loc, scale)
        return summary

    def _exact_log_prob(self, index: torch.Tensor, z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor
                        ) -> torch.Tensor:
        """The exact leave-one-out log p(z | not n) of the components ``loc``, ``scale``, in chunks of 64 points."""
        return torch.cat([self.mixture(part, loc, scale).log_prob(at)
                          for part, at in zip(index.split(64), z.split(64), strict=True)])
