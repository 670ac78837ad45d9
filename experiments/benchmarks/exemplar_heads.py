"""Which head would make the scalable exemplar estimate exact, at a checkpoint of a real run (issue 7).

    vae-priors bench exemplar-heads RUN_DIR [--points 256] [--tail 512]

Loads ``RUN_DIR/checkpoints/vae-exemplar.pt``, takes the prior's components as the checkpoint defines them (with
``exemplar_components = "epoch"``: the epoch's stored components, which the run's cache equals; otherwise the
current encoder's, i.e. a cache with no age), draws z ~ q(z|x_n) from the current encoder at ``--points``
training points, and compares the head/tail estimate of log p(z | not n) (head exact, weight 1/(N-1) each; tail:
``--tail`` uniform draws standing for the other exemplars, as in ``ExemplarPrior``) with the exact leave-one-out
mixture, for heads chosen in different ways (nats per point, mean |error| and mean):

* the k (5k, 10k) nearest components of the point's own component, or the k of its current mean (a table built
  once per epoch can hold these: the own component does not move within an epoch); the k nearest and their own k
  nearest (what ``hops=2`` takes from an exact table);
* the k (or 5k) nearest components of z itself (a search per sample);
* IVF: the members of the ``probe`` clusters nearest to z, of a k-means partition of the components
  (scikit-learn's ``KMeans``, 8 Lloyd iterations);
* the run's own estimate (its table and settings, the tail ``--tail``), and the same with ``--cluster-draws`` draws
  per point around z from each of ``--clusters`` k-means partitions (``ExemplarPrior(clusters=C)``, fitted as
  three renewals would fit them).

It then times, per batch of 100 samples on one thread, the two searches around z (brute force over all N; IVF
with the partition built) against a ``vae`` training step of the same nets.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import pyro
import torch
from sklearn.cluster import KMeans

from vae_priors.experiments.benchmarks.mixture_prior_bench import make_step
from vae_priors.experiments.files import load_torch
from vae_priors.experiments.runs.layout import build_pair, load_run
from vae_priors.experiments.runtime import set_threads
from vae_priors.experiments.training.objectives import make_elbo
from vae_priors.models.mixture_distributions import gaussian_log_density_matrix


def head_tail_error(z: torch.Tensor, index: torch.Tensor, heads: list[torch.Tensor], loc: torch.Tensor,
                    scale: torch.Tensor, exact: torch.Tensor, tail: int, generator: torch.Generator) -> torch.Tensor:
    """Per point: the head/tail estimate of log p(z | not n) minus the exact value."""
    n, out = loc.shape[0], []
    for b, head in enumerate(heads):
        head = head[head != index[b]].unique()
        draws = torch.randint(0, n, (tail,), generator=generator)
        draws = draws[~torch.isin(draws, torch.cat([head, index[b : b + 1]]))]
        at = z[b : b + 1]
        log_head = gaussian_log_density_matrix(at, loc[head], scale[head])[0].logsumexp(0) - math.log(n - 1)
        log_tail = (gaussian_log_density_matrix(at, loc[draws], scale[draws])[0].logsumexp(0)
                    + math.log((n - 1 - len(head)) / (n - 1) / len(draws)))
        out.append(torch.logaddexp(log_head, log_tail))
    return torch.stack(out) - exact


def _line(label: str, error: torch.Tensor, heads: list[torch.Tensor]) -> str:
    size = sum(len(h) for h in heads) / len(heads)
    return f"  {label:<38} |err| {error.abs().mean().item():6.3f}  mean {error.mean().item():7.3f}  head {size:6.0f}"


@torch.no_grad()
def run(run_dir: Path, points: int, tail: int, seed: int, cluster_counts: tuple[int, ...] = (),
        cluster_draws: int = 256) -> None:
    config, data = load_run(run_dir)
    pair, dataset = build_pair(config, data, "vae-exemplar")
    prior = pair.model.prior
    saved = load_torch(run_dir / "checkpoints" / "vae-exemplar.pt", "checkpoint", weights_only=False)
    pair.objective(make_elbo(config.svi.objective)).load_state_dict(saved["objective"])
    x, k = dataset.train.x, prior.neighbors
    comp_loc, comp_scale = prior._components()
    comp_scale = prior._component_scale(comp_scale)
    now_loc, now_scale = prior._encode_all()
    gen = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(x), generator=gen)[:points]
    z = now_loc[index] + now_scale[index] * torch.randn(points, now_loc.shape[1], generator=gen)
    dens = torch.cat([gaussian_log_density_matrix(z[i : i + 64], comp_loc, comp_scale) for i in range(0, points, 64)])
    dens[torch.arange(points), index] = -math.inf
    exact = dens.logsumexp(1) - math.log(len(x) - 1)
    shares = (dens.topk(min(100, len(x) - 1), 1).values - dens.logsumexp(1, keepdim=True)).exp()
    s = comp_scale[0, 0].item()
    moved = (now_loc - comp_loc).norm(dim=1).mean() / s
    print(f"{run_dir.name}: epoch {saved['state']['epoch']}, components {prior.components}, N = {len(x)}, k = {k}, "
          f"tail {tail}, {points} points, s = {s:.3f}; the current means are {moved:.2f} s "
          f"from the components; mixture share of the 1 / 10 / 100 largest: {shares[:, 0].mean():.2f} / "
          f"{shares[:, :10].sum(1).mean():.2f} / {shares.sum(1).mean():.2f}")

    def nearest(queries: torch.Tensor, count: int) -> list[torch.Tensor]:
        d2 = comp_loc.pow(2).sum(1) - 2 * queries @ comp_loc.T
        d2[torch.arange(points), index] = math.inf
        return list(d2.topk(min(count, len(x) - 1), 1, largest=False).indices)

    own = torch.stack(nearest(comp_loc[index], k))  # (points, k)
    d2 = comp_loc.pow(2).sum(1) - 2 * comp_loc[own.flatten()] @ comp_loc.T
    d2[torch.arange(own.numel()), own.flatten()] = math.inf
    second = d2.topk(min(k, len(x) - 1), 1, largest=False).indices.view(points, -1)  # their own k nearest
    two_hops = list(torch.cat([own, second], 1))  # what hops=2 takes from an exact table (n itself is dropped)
    for label, heads in ((f"{k} nearest of its own component", list(own)),
                         (f"the same and their {k} nearest (2 hops)", two_hops),
                         (f"{5 * k} nearest of its own component", nearest(comp_loc[index], 5 * k)),
                         (f"{10 * k} nearest of its own component", nearest(comp_loc[index], 10 * k)),
                         (f"{k} nearest of its current mean", nearest(now_loc[index], k)),
                         (f"{k} nearest of z", nearest(z, k)), (f"{5 * k} nearest of z", nearest(z, 5 * k))):
        print(_line(label, head_tail_error(z, index, heads, comp_loc, comp_scale, exact, tail, gen), heads))
    partitions = {}
    for clusters, probe in ((256, 3), (256, 8), (1024, 8)):
        clusters = min(clusters, len(x) // 4)  # small data sets (the tests): fewer, larger clusters
        probe = min(probe, clusters)
        if clusters not in partitions:
            start = time.perf_counter()
            fitted = KMeans(clusters, n_init=1, max_iter=8, random_state=seed).fit(comp_loc.numpy())
            assign, centres = torch.as_tensor(fitted.labels_), torch.as_tensor(fitted.cluster_centers_)
            members = [torch.nonzero(assign == c).flatten() for c in range(clusters)]
            partitions[clusters] = centres, members, time.perf_counter() - start
        centres, members, built = partitions[clusters]
        probed = (centres.pow(2).sum(1) - 2 * z @ centres.T).topk(probe, 1, largest=False).indices
        heads = [torch.cat([members[c] for c in row.tolist()]) for row in probed]
        label = f"IVF: {probe} of {clusters} clusters (k-means {built:.1f} s)"
        print(_line(label, head_tail_error(z, index, heads, comp_loc, comp_scale, exact, tail, gen), heads))
    _own_estimate(prior, index, z, exact, tail, cluster_counts, cluster_draws, seed)
    _search_cost(config, data, x, comp_loc, partitions[min(256, len(x) // 4)], seed)


def _own_estimate(prior, index: torch.Tensor, z: torch.Tensor, exact: torch.Tensor, tail: int,
                  clusters: tuple[int, ...], cluster_draws: int, seed: int) -> None:
    """The run's own estimator at its checkpoint (table as saved), without and with draws around z."""
    prior.subset = tail
    for count in (0, *clusters):
        prior.clusters, prior.cluster_draws, prior._clusters, prior._centres = count, cluster_draws, None, None
        start = time.perf_counter()
        for renewal in range(3 if count else 0):  # warm-started as a run's renewals are
            prior._fit_clusters(generator=torch.Generator().manual_seed(seed + renewal))
        fitted = (time.perf_counter() - start) / 3
        error = prior._estimated_log_prob(index, z, torch.Generator().manual_seed(seed)) - exact
        label = f"run's estimate + {cluster_draws} draws around z, {count} clusters" if count else (
            f"the run's estimate ({prior.neighbors}-row table, {prior.hops} hops)")
        print(f"  {label:<38} |err| {error.abs().mean().item():6.3f}  mean {error.mean().item():7.3f}"
              + (f"  k-means {fitted:.2f} s per renewal" if count else ""))


def _search_cost(config, data, train_x: torch.Tensor, comp_loc: torch.Tensor, partition, seed: int,
                 reps: int = 20) -> None:
    """Median ms per batch of 100 queries: brute-force k nearest, IVF (8 of 256) gather, and a ``vae`` step."""
    centres, members, _ = partition
    sizes = torch.tensor([len(m) for m in members])
    padded = torch.full((len(members), int(sizes.max())), -1, dtype=torch.long)
    for c, m in enumerate(members):
        padded[c, : len(m)] = m
    queries = comp_loc[torch.randperm(len(comp_loc), generator=torch.Generator().manual_seed(seed))[:100]]
    probe, k = min(8, len(members)), min(10, len(comp_loc) - 1)

    def brute() -> None:
        (comp_loc.pow(2).sum(1) - 2 * queries @ comp_loc.T).topk(k, 1, largest=False)

    def ivf() -> None:
        ids = padded[(centres.pow(2).sum(1) - 2 * queries @ centres.T).topk(probe, 1, largest=False).indices]
        ids = ids.flatten(1)
        gathered = comp_loc[ids.clamp_min(0)]  # (100, 8 * largest cluster, D): the candidates' means
        (gathered - queries[:, None]).pow(2).sum(-1).masked_fill(ids < 0, math.inf).topk(k, 1, largest=False)

    pyro.set_rng_seed(seed)
    with torch.enable_grad():
        step = make_step(build_pair(config, data, "vae")[0], train_x, 100, seed)
    times: dict[str, list[float]] = {"vae step": [], "brute-force search": [], "IVF search": []}
    for _ in range(reps + 2):  # interleaved; the first two of each are warm-up
        for name, work in (("brute-force search", brute), ("IVF search", ivf)):
            start = time.perf_counter()
            work()
            times[name].append(time.perf_counter() - start)
        with torch.enable_grad():
            times["vae step"].append(step())
    rows = min(2000, len(comp_loc))  # the exact 5k-nearest table of all N components, timed on some rows
    start = time.perf_counter()
    for part in comp_loc[:rows].split(500):
        (comp_loc.pow(2).sum(1) - 2 * part @ comp_loc.T).topk(min(5 * k, len(comp_loc) - 1), 1, largest=False)
    table = (time.perf_counter() - start) * len(comp_loc) / rows
    base = statistics.median(times["vae step"][2:])
    print("  per batch of 100, one process: " + "; ".join(
        f"{name} {1e3 * statistics.median(values[2:]):.1f} ms ({statistics.median(values[2:]) / base:.2f}x the vae "
        f"step)" for name, values in times.items()) + f"; the exact {5 * k}-nearest table of all N (once per "
        f"epoch) {table:.1f} s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run with a vae-exemplar checkpoint (scalable path)")
    parser.add_argument("--points", type=int, default=256)
    parser.add_argument("--tail", type=int, default=512, help="uniform tail draws M")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clusters", type=int, nargs="*", default=[256, 1024],
                        help="k-means partitions to draw around z from (the run's own estimate with each)")
    parser.add_argument("--cluster-draws", type=int, default=256, help="draws per point around z")
    args = parser.parse_args(argv)
    if min(args.clusters, default=1) < 1 or args.cluster_draws < 1:
        raise SystemExit(f"--clusters and --cluster-draws must be >= 1, got {args.clusters} and {args.cluster_draws}")
    set_threads(args.threads)
    run(args.run_dir, args.points, args.tail, args.seed, tuple(args.clusters), args.cluster_draws)


if __name__ == "__main__":
    main()
