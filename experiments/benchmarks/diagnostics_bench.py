"""Time the diagnostics per stage on MNIST-sized data (issue 3, "Performance": 10 000 points, S = 1000, < 5 min).

    vae-priors bench diagnostics [--points 10000] [--particles 1000] [--samples 10000]

A ``vae`` pair (784 -> 300-300 -> 40, Bernoulli) with untrained weights on random binary images: the cost does
not depend on the values. Stages: log weights (decoder passes), PSIS, per-point KL, aggregate (surgery, reverse KL,
prior hole) -- the last two include tracing the guide and the model once more --, sampling (the ex-post
GMM fit and decoding ``--generated`` samples from p(z), q_agg and the GMM) and the plots.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from vae_priors.experiments.config import ModelConfig
from vae_priors.experiments.data.datasets import Dataset, Split
from vae_priors.experiments.diagnostics import arviz_adapter
from vae_priors.experiments.diagnostics.aggregate import (
    aggregate_diagnostics,
    posterior_components,
    prior_components,
)
from vae_priors.experiments.diagnostics.generation import generate, latent_samplers
from vae_priors.experiments.diagnostics.point_kl import point_kl
from vae_priors.experiments.evaluation.log_weights import log_weights
from vae_priors.experiments.registry import get_variant
from vae_priors.experiments.reporting import plots


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=10_000)
    parser.add_argument("--particles", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=10_000, help="Monte Carlo draws from q_agg and p each")
    parser.add_argument("--generated", type=int, default=1000, help="decoded samples per generation source")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x = torch.bernoulli(torch.full((args.points, 784), 0.3), generator=g)
    split = Split(x)
    data = Dataset("bench", split, split, split)
    pair = get_variant("vae").factory(data, ModelConfig(latent_dim=40, hidden=[300, 300]), "bernoulli")
    times = {}

    start = time.perf_counter()
    weights = log_weights(pair.model, pair.guide, (x,), args.particles)
    times["log weights"] = time.perf_counter() - start

    start = time.perf_counter()
    smoothed, khat = arviz_adapter.psis(weights.log_w.double().T.numpy())
    times["psis"] = time.perf_counter() - start

    start = time.perf_counter()
    with torch.no_grad():
        q, p = posterior_components(pair.guide, (x,)), prior_components(pair.model, pair.guide, (x,))
        point_kl(q, p)
    times["per-point kl"] = time.perf_counter() - start

    start = time.perf_counter()
    result = aggregate_diagnostics(pair, split, args.samples, seed=0)
    times["aggregate"] = time.perf_counter() - start

    start = time.perf_counter()
    with torch.no_grad():
        samplers = latent_samplers(pair.model, q, x.shape[1], seed=0)  # includes the ex-post GMM fit
        samples = generate(pair.model, samplers, x.shape[1], args.generated, seed=0)
    times["sampling"] = time.perf_counter() - start

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        z_q, z_p = samplers["q_agg"].sample(2000, 0), samplers["prior"].sample(2000, 0)
        plots.marginals(z_q, z_p, Path(out) / "marginals.png")
        plots.latent_2d(z_q, z_p, Path(out) / "latent2d.png")
        threshold = arviz_adapter.khat_threshold(args.particles)
        log_lik = np.logaddexp.reduce(smoothed, axis=1) - math.log(args.particles)
        elpd = arviz_adapter.elpd_data(log_lik, khat, args.particles)
        plots.khat(lambda ax: arviz_adapter.plot_khat(elpd, ax), Path(out) / "khat.png", (khat > threshold).mean(),
                   threshold)
        plots.image_rows({k: v.mean[:12] for k, v in samples.items()}, (28, 28), Path(out) / "samples.png")
    times["plots"] = time.perf_counter() - start

    print(f"{args.points} points x {args.particles} particles, {args.samples} aggregate draws, "
          f"{torch.get_num_threads()} threads")
    for name, sec in times.items():
        print(f"  {name:14s} {sec:8.1f} s")
    print(f"  {'total':14s} {sum(times.values()):8.1f} s  (mean log p(x) "
          f"{float(torch.logsumexp(weights.log_w.double(), 0).mean() - math.log(args.particles)):.1f}, "
          f"I = {result.mutual_info:.2f}, KL(q_agg||p) = {result.kl_qagg_p:.2f})")


if __name__ == "__main__":
    main()
