"""Step time of the exemplar prior (exact and scalable paths) against the N(0, I) ``vae`` step, and the
scalable path's log-density error, on binarized MNIST (784-dim binary input, 300-300 MLPs, 40 latents).

For each N in ``--sizes`` the three pairs take SVI steps in turn (vae, exact, scalable, vae, ...), each step
timed alone; the table gives median step times, their ratios to the ``vae`` step, and the ratio with the
scalable path's cache refresh (timed separately) spread over the steps of an epoch. The error is the
scalable log p(z) minus the exact leave-one-out log p(z) from the current encoder, for z ~ q(z|x_n) on
``--error-points`` training points (nats per point: mean absolute value and mean), in two settings: "fresh",
right after a refresh, and "stale", after ``--stale-steps`` further training steps without a refresh (the
cache is then as old as it gets within an epoch of that many steps). The stale error is also printed
against the tail size M (``--error-subsets``), on the same cache.

    vae-priors bench mixture-prior --data ../shared/data/binarized_mnist/binarized_mnist.npz

``--model CONFIG`` builds the nets and the exemplar prior from a run config's ``[model]`` instead (gated layers,
a shared variance, ``exemplar_components = "epoch"``: then "refresh" is the epoch's renewal, all N encoded again).

``--epoch-cost CONFIG`` instead times whole epochs through ``fit`` (steps, validation with the exact mixture, the
cache's ``end_epoch``) of ``vae`` and ``vae-exemplar`` under a run config, taking turns: the per-epoch ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import numpy as np
import pyro
import torch
from pyro.infer import Trace_ELBO

from vae_priors.experiments.config import ModelConfig
from vae_priors.experiments.config import load as load_config
from vae_priors.experiments.data.datasets import Dataset, Split
from vae_priors.experiments.registry import get_variant
from vae_priors.experiments.runs.layout import build_pair, load_run_data
from vae_priors.experiments.runtime import set_threads
from vae_priors.experiments.training.svi import fit
from vae_priors.models.plate import subsample

DEFAULT_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "binarized_mnist" / "binarized_mnist.npz"


def make_step(pair, x: torch.Tensor, batch_size: int, seed: int):
    """A closure taking one timed SVI step (Adam) on a random minibatch; returns its seconds."""
    objective = pair.objective(Trace_ELBO())
    optimizer = torch.optim.Adam(objective.parameters(), lr=1e-3, foreach=True)  # as experiments.training.svi.fit
    gen = torch.Generator().manual_seed(seed)
    n = x.shape[0]

    def step() -> float:
        index = torch.randperm(n, generator=gen)[:batch_size]
        start = time.perf_counter()
        with subsample(index, n), pyro.validation_enabled(False):  # as fit's steps after its first
            loss = objective(x[index]) / n
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    return step


@torch.no_grad()
def scalable_error(prior, x: torch.Tensor, num_points: int, seed: int) -> tuple[float, float]:
    """Mean |error| and mean error (nats per point) of the scalable log p(z) against the exact one."""
    torch.manual_seed(seed)
    index = torch.randperm(x.shape[0])[:num_points]
    z = prior.guide.encode(x[index]).sample()
    scalable = torch.cat([prior(index[i : i + 128]).log_prob(z[i : i + 128]) for i in range(0, num_points, 128)])
    error = scalable - prior.mixture(index).log_prob(z)
    return error.abs().mean().item(), error.mean().item()


def errors_by_subset(prior, x: torch.Tensor, subsets: list[int], num_points: int,
                     seed: int) -> dict[int, tuple[float, float]]:
    """Errors by tail size M, on the current cache (no refresh happens while they are measured)."""
    refresh_points, subset, out = prior.refresh_points, prior.subset, {}
    prior.refresh_points = float("inf")
    for m in subsets:
        prior.subset = m
        out[m] = scalable_error(prior, x, num_points, seed)
    prior.refresh_points, prior.subset = refresh_points, subset
    return out


def stale_errors(prior, step, x: torch.Tensor, steps: int, subsets: list[int], num_points: int,
                 seed: int) -> dict[int, tuple[float, float]]:
    """Errors by tail size M after ``steps`` training steps with the cache left as it was after a refresh."""
    refresh_points = prior.refresh_points
    prior.refresh_points = float("inf")
    for _ in range(steps):
        step()
    prior.refresh_points = refresh_points
    return errors_by_subset(prior, x, subsets, num_points, seed)


def run(data_path: Path, sizes: list[int], reps: int, exact_reps: int, batch_size: int, seed: int,
        error_points: int = 512, stale_steps: int = 100, error_subsets: tuple[int, ...] = (256, 512, 1024),
        model: ModelConfig | None = None) -> None:
    train = torch.as_tensor(np.load(data_path)["train"], dtype=torch.float32)
    model = model or ModelConfig(latent_dim=40, hidden=[300, 300])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {batch_size}, reps {reps} "
          f"(exact path: {exact_reps} at N > 10000); nets {model.layer} {model.hidden}, {model.latent_dim} latents, "
          f"exemplar variance {model.exemplar_variance}, components {model.exemplar_components}, hops "
          f"{model.exemplar_hops}")
    header = (f"{'N':>6} {'path':<9} {'median ms':>10} {'x vae':>7} {'x vae +refresh':>15} {'refresh s':>10} "
              f"{'fresh |err|':>11} {'mean err':>9} {'stale |err|':>11} {'mean err':>9}")
    print(header)
    for n in sizes:
        x = train[:n]
        data = Dataset("binarized-mnist", Split(x), Split(x[:1]), Split(x[:1]))
        pairs, steps = {}, {}
        for name, path in (("vae", None), ("exact", "exact"), ("scalable", "scalable")):
            pyro.set_rng_seed(seed)
            model_cfg = dataclasses.replace(model, exemplar_path=path or "auto")
            pairs[name] = get_variant("vae" if path is None else "vae-exemplar").factory(data, model_cfg, "bernoulli")
            steps[name] = make_step(pairs[name], x, batch_size, seed)
            for _ in range(2):  # warm-up (oneDNN) and the scalable path's first cache build
                steps[name]()
        times = {name: [] for name in steps}
        for rep in range(reps):  # interleaved: vae, exact, scalable, vae, ...
            for name, step in steps.items():
                if name == "exact" and n > 10000 and rep >= exact_reps:
                    continue
                times[name].append(step())
        prior = pairs["scalable"].model.prior
        start = time.perf_counter()
        if prior.components == "epoch":  # a new epoch: all N encoded again, then the cache on them
            prior._renew_components()
        prior.refresh()
        refresh = time.perf_counter() - start
        subsets = sorted({min(m, n) for m in (*error_subsets, prior.subset)})
        fresh = errors_by_subset(prior, x, subsets, error_points, seed)
        err_abs, err_mean = fresh[prior.subset]
        stale = stale_errors(prior, steps["scalable"], x, stale_steps, subsets, error_points, seed)
        base = statistics.median(times["vae"])
        for name in ("vae", "exact", "scalable"):
            med = statistics.median(times[name])
            amortized = (med + refresh * batch_size / n) / base if name == "scalable" else med / base
            extra = (f"{refresh:>10.2f} {err_abs:>11.3f} {err_mean:>9.3f} {stale[prior.subset][0]:>11.3f} "
                     f"{stale[prior.subset][1]:>9.3f}" if name == "scalable" else "")
            print(f"{n:>6} {name:<9} {1e3 * med:>10.1f} {med / base:>7.2f} {amortized:>15.2f} {extra}")
        for label, errors in ((" fresh", fresh), (f" stale ({stale_steps} steps past the refresh)", stale)):
            print(f"{n:>6} error{label} by tail size M: " +
                  ", ".join(f"M={m}: |err| {a:.3f} mean {e:.3f}" for m, (a, e) in errors.items()))


def epoch_cost(config_path: Path, epochs: int, rounds: int, skip: int = 1) -> None:
    """Whole epochs through ``fit`` (steps, validation, the prior's ``end_epoch``) of ``vae`` and ``vae-exemplar``
    under a run config, taking turns ``rounds`` times; the median epoch seconds and their ratio, leaving out the
    first ``skip`` epochs of each turn (the first builds the cache and warms up oneDNN; a young neighbour table
    sweeps several times in the next few, a settled one once)."""
    if not 0 <= skip < epochs:
        raise SystemExit(f"--skip {skip} leaves no epoch of {epochs} to time; use 0 <= --skip < --epochs")
    config = load_config(config_path)
    data = load_run_data(config.data)
    svi = dataclasses.replace(config.svi, epochs=epochs, patience=epochs + 1)
    seconds: dict[str, list[float]] = {"vae": [], "vae-exemplar": []}
    for _ in range(rounds):
        for name in seconds:
            pair, dataset = build_pair(config, data, name)
            history = fit(pair, dataset, svi, seed=config.seed, progress=False).history
            seconds[name] += list(history.seconds[skip:])
    base = statistics.median(seconds["vae"])
    print(f"{config_path.name}: epochs of {len(dataset.train)} points in batches of {svi.batch_size}, validation on "
          f"{len(dataset.val)}, torch {torch.__version__}, {torch.get_num_threads()} thread(s); {rounds} rounds of "
          f"{epochs} epochs, the first {skip} of each left out")
    for name, values in seconds.items():
        median = statistics.median(values)
        print(f"  {name:<13} median {median:6.2f} s per epoch ({', '.join(f'{v:.2f}' for v in values)}): "
              f"{median / base:.2f}x vae")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="binarized_mnist.npz (arrays train/valid/test)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 50000])
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--exact-reps", type=int, default=3, help="timed exact-path steps when N > 10000 (slow)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--error-points", type=int, default=512, help="training points the error is averaged over")
    parser.add_argument("--stale-steps", type=int, default=100, help="training steps past the refresh (stale error)")
    parser.add_argument("--error-subsets", type=int, nargs="+", default=[256, 512, 1024], help="tail sizes M")
    parser.add_argument("--epoch-cost", type=Path, metavar="CONFIG",
                        help="instead: whole epochs of vae and vae-exemplar under this run config, side by side")
    parser.add_argument("--model", type=Path, metavar="CONFIG", help="take the nets and the exemplar settings from "
                        "this run config's [model] (default: 784-300-300-40 ReLU nets, encoder variances)")
    parser.add_argument("--epochs", type=int, default=3, help="with --epoch-cost: epochs per turn")
    parser.add_argument("--rounds", type=int, default=2, help="with --epoch-cost: turns of each variant")
    parser.add_argument("--skip", type=int, default=1, help="with --epoch-cost: first epochs of each turn not timed")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: cores / processes); the study's "
                        "numbers use 1, as its runs do")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    if args.epoch_cost:
        return epoch_cost(args.epoch_cost, args.epochs, args.rounds, args.skip)
    if not args.data.is_file():
        parser.error(f"{args.data} does not exist; pass --data PATH/binarized_mnist.npz")
    run(args.data, args.sizes, args.reps, args.exact_reps, args.batch_size, args.seed, args.error_points,
        args.stale_steps, args.error_subsets, load_config(args.model).model if args.model else None)


if __name__ == "__main__":
    main()
