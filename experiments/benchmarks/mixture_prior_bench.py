"""Step time of the exemplar prior (exact and scalable paths) against the N(0, I) ``vae`` step, and the
scalable path's log-density error, on binarized MNIST (784-dim binary input, 300-300 MLPs, 40 latents).

For each N in ``--sizes`` the three pairs take SVI steps in turn (vae, exact, scalable, vae, ...), each step
timed alone; the table gives median step times, their ratios to the ``vae`` step, and the ratio with the
scalable path's cache refresh (timed separately) spread over the steps of an epoch. The error is the
scalable log p(z) minus the exact leave-one-out log p(z), for z ~ q(z|x_n) on one batch, after the timed
steps (nats per point: mean absolute value and mean).

    python -m experiments.benchmarks.mixture_prior_bench --data ../shared/data/binarized_mnist/binarized_mnist.npz
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import pyro
import torch
from pyro.infer import Trace_ELBO

from experiments.config import ModelConfig
from experiments.data import Dataset, Split
from experiments.registry import get_variant
from models.plate import subsample

DEFAULT_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "binarized_mnist" / "binarized_mnist.npz"


def make_step(pair, x: torch.Tensor, batch_size: int, seed: int):
    """A closure taking one timed SVI step (Adam) on a random minibatch; returns its seconds."""
    objective = pair.objective(Trace_ELBO())
    optimizer = torch.optim.Adam(objective.parameters(), lr=1e-3, foreach=True)  # as experiments.svi.fit
    gen = torch.Generator().manual_seed(seed)
    n = x.shape[0]

    def step() -> float:
        index = torch.randperm(n, generator=gen)[:batch_size]
        start = time.perf_counter()
        with subsample(index, n):
            loss = objective(x[index]) / n
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    return step


@torch.no_grad()
def scalable_error(prior, x: torch.Tensor, batch_size: int) -> tuple[float, float]:
    """Mean |error| and mean error (nats per point) of the scalable log p(z) against the exact one."""
    index = torch.randperm(x.shape[0])[:batch_size]
    z = prior.guide.encode(x[index]).sample()
    error = prior(index).log_prob(z) - prior.mixture(index).log_prob(z)
    return error.abs().mean().item(), error.mean().item()


def run(data_path: Path, sizes: list[int], reps: int, exact_reps: int, batch_size: int, seed: int) -> None:
    train = torch.as_tensor(np.load(data_path)["train"], dtype=torch.float32)
    cfg = dict(latent_dim=40, hidden=[300, 300])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {batch_size}, reps {reps} "
          f"(exact path: {exact_reps} at N > 10000)")
    header = (f"{'N':>6} {'path':<9} {'median ms':>10} {'x vae':>7} {'x vae +refresh':>15} {'refresh s':>10} "
              f"{'|err| nats':>11} {'mean err':>9}")
    print(header)
    for n in sizes:
        x = train[:n]
        data = Dataset("binarized-mnist", Split(x), Split(x[:1]), Split(x[:1]))
        pairs, steps = {}, {}
        for name, path in (("vae", None), ("exact", "exact"), ("scalable", "scalable")):
            pyro.set_rng_seed(seed)
            model_cfg = ModelConfig(**cfg, exemplar_path=path or "auto", exemplar_subset=min(1024, n))
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
        prior.refresh()
        refresh = time.perf_counter() - start
        err_abs, err_mean = scalable_error(prior, x, batch_size)
        base = statistics.median(times["vae"])
        for name in ("vae", "exact", "scalable"):
            med = statistics.median(times[name])
            amortized = (med + refresh * batch_size / n) / base if name == "scalable" else med / base
            extra = f"{refresh:>10.2f} {err_abs:>11.3f} {err_mean:>9.3f}" if name == "scalable" else ""
            print(f"{n:>6} {name:<9} {1e3 * med:>10.1f} {med / base:>7.2f} {amortized:>15.2f} {extra}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="binarized_mnist.npz (arrays train/valid/test)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 50000])
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--exact-reps", type=int, default=3, help="timed exact-path steps when N > 10000 (slow)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.data.is_file():
        parser.error(f"{args.data} does not exist; pass --data PATH/binarized_mnist.npz")
    run(args.data, args.sizes, args.reps, args.exact_reps, args.batch_size, args.seed)


if __name__ == "__main__":
    main()
