"""Where the scalable exemplar prior's error comes from, at a point of a real training run (issue 7).

    vae-priors bench exemplar-staleness RUN_DIR [--steps 100] [--points 256] [--drift none|affine]

Loads the ``vae-exemplar`` checkpoint of a run (``RUN_DIR/checkpoints/vae-exemplar.pt``: the nets and the
optimizer at the end of its last finished epoch), rebuilds the cache from the current encoder (three neighbour
sweeps from a fresh table), takes ``--steps`` training steps as the run would (write-back included), and then
compares log p(z | not n) for z ~ q(z|x_n) at ``--points`` training points with the exact leave-one-out mixture
of the current encoder (nats per point, mean |error| and mean):

* ``cached, all N``: the exact mixture of the cached components (no head/tail sampling): the cache's age alone;
* ``estimator``: the scalable estimate the training step uses (cached components, table head, tail of M);
* ``current components, same table``: the estimator with every component from the current encoder;
* ``current components, exact kNN head``: the same with the table replaced by the exact k nearest means;

then the table's recall of the exact k nearest, the share of the mixture at z held by its 1 / 10 / 100 largest
components, the mean distance the means moved over the steps in units of the component scale, and the cost of a
step, of the validation pass (exact mixture) and of ``end_epoch``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import pyro
import torch

from vae_priors.experiments.files import load_torch
from vae_priors.experiments.runs.layout import build_pair, load_run
from vae_priors.experiments.runtime import set_threads
from vae_priors.experiments.training.objectives import make_elbo
from vae_priors.experiments.training.svi import mean_elbo, svi_step
from vae_priors.models.mixture_distributions import gaussian_log_density_matrix


def _mean_error(error: torch.Tensor) -> str:
    return f"|err| {error.abs().mean().item():6.3f}  mean {error.mean().item():7.3f}"


def run(run_dir: Path, steps: int, points: int, seed: int, drift: str | None = None) -> None:
    config, data = load_run(run_dir)
    if drift is not None:  # follow the encoder another way than the run did, from the same checkpoint
        config.model.exemplar_drift = drift
    pair, dataset = build_pair(config, data, "vae-exemplar")
    prior = pair.model.prior
    if prior.path != "scalable":
        raise SystemExit(f"{run_dir}: its vae-exemplar uses the exact path; nothing is estimated")
    objective = pair.objective(make_elbo(config.svi.objective, config.svi.num_particles))
    optimizer = torch.optim.Adam(objective.parameters(), lr=config.svi.lr, foreach=True)
    saved = load_torch(run_dir / "checkpoints" / "vae-exemplar.pt", "checkpoint", weights_only=False)
    objective.load_state_dict(saved["objective"])
    optimizer.load_state_dict(saved["optimizer"])
    x, n = dataset.train.x, len(dataset.train)
    objective.train()
    pyro.set_rng_seed(seed)
    prior.refresh()
    for _ in range(2):
        prior.refresh(prior._loc, prior._scale)
    anchor = prior._loc.clone()  # the refresh's encodings, before any write-back
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    times = []
    for i in range(steps):
        index = order[(i * config.svi.batch_size) % n :][: config.svi.batch_size]
        start = time.perf_counter()
        svi_step(objective, optimizer, (x[index],), index, n, validate=False)
        times.append(time.perf_counter() - start)
    with torch.no_grad():
        objective.eval()
        loc, scale = prior._encode(x, x)  # the current encoder
        objective.train()
        rng = torch.Generator().manual_seed(seed + 1)
        index = torch.randperm(n, generator=rng)[:points]
        z = loc[index] + scale[index] * torch.randn(points, loc.shape[1], generator=rng)
        s = prior._component_scale(loc[:1])[0, 0].item() if prior.variance == "shared" else math.nan
        print(f"{run_dir.name}: epoch {saved['state']['epoch']} + {steps} steps, N = {n}, k = {prior.neighbors}, "
              f"M = {prior.subset}, {points} points, torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
        exact = prior.mixture(index, loc, scale).log_prob(z)
        stale = prior.mixture(index, prior._current(prior._loc), prior._scale).log_prob(z)
        print(f"  cached, all N                       {_mean_error(stale - exact)}")
        print(f"  estimator                           {_mean_error(prior.estimate_error(index, z, loc, scale, rng))}")
        # the refresh's components (no write-back), as they are and moved by each scored point's own drift since
        drift = loc[index] - anchor[index]
        at_refresh = prior.mixture(index, anchor, scale)
        print(f"  refresh-time components, all N      {_mean_error(at_refresh.log_prob(z) - exact)}")
        print(f"  the same, moved by the point's drift {_mean_error(at_refresh.log_prob(z - drift) - exact)}")
        stored = prior._loc, prior._scale, prior._map
        cached = prior._current(prior._loc)
        prior._loc, prior._scale, prior._map = loc, scale, None  # the current encodings need no map
        print(f"  current components, same table      {_mean_error(prior.estimate_error(index, z, loc, scale, rng))}")
        d2 = torch.cdist(loc[index], loc).pow(2)
        d2[torch.arange(points), index] = math.inf
        nearest = d2.topk(prior.neighbors, largest=False).indices
        recall = (prior._table[index][:, :, None] == nearest[:, None, :]).any(-1).double().mean().item()
        table = prior._table[index].clone()
        prior._table[index] = nearest
        print(f"  current components, exact kNN head  {_mean_error(prior.estimate_error(index, z, loc, scale, rng))}")
        prior._table[index] = table
        prior._loc, prior._scale, prior._map = stored
        weights = torch.cat([_responsibilities(prior, loc, scale, z[i : i + 64], index[i : i + 64])
                             for i in range(0, points, 64)])
        shares = [weights.topk(k, -1).values.sum(-1).mean().item() for k in (1, 10, 100)]
        others = loc[nearest] - anchor[nearest]  # the drift of each point's k nearest exemplars
        apart = (others - drift[:, None]).norm(dim=-1).mean().item() / drift.norm(dim=-1).mean().item()
        moved = (cached - loc).norm(dim=1).mean().item()
        print(f"  table recall@{prior.neighbors} {recall:.2f}; mixture share of the 1 / 10 / 100 largest components "
              f"{shares[0]:.2f} / {shares[1]:.2f} / {shares[2]:.2f}; shared scale s = {s:.3f}; means moved "
              f"{moved:.3f} = {moved / s:.2f} s from the cached ones ({prior.drift} drift) after {steps} steps; "
              f"a neighbour's drift differs from the point's by {apart:.2f} of the point's")
    start = time.perf_counter()
    mean_elbo(objective, dataset.val)
    validation = time.perf_counter() - start
    start = time.perf_counter()
    prior.end_epoch()  # reuses the validation's encodings, as in fit
    upkeep = time.perf_counter() - start
    print(f"  cost: median step {1e3 * statistics.median(times):.1f} ms; validation ({len(dataset.val)} points, exact "
          f"mixture) {validation:.2f} s; end_epoch (error check and neighbour sweep) {upkeep:.2f} s")


def _responsibilities(prior, loc: torch.Tensor, scale: torch.Tensor, z: torch.Tensor,
                      index: torch.Tensor) -> torch.Tensor:
    """Each component's share of the exact leave-one-out mixture at z: (points, N)."""
    dens = gaussian_log_density_matrix(z, loc, prior._component_scale(scale))
    dens[torch.arange(len(index)), index] = -math.inf
    return dens.softmax(-1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run with a vae-exemplar checkpoint (scalable path)")
    parser.add_argument("--steps", type=int, default=100, help="training steps between the cache and the check")
    parser.add_argument("--points", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--drift", choices=("none", "affine"), help="how the cache follows the encoder (default: "
                        "the run's model.exemplar_drift)")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    run(args.run_dir, args.steps, args.points, args.seed, args.drift)


if __name__ == "__main__":
    main()
