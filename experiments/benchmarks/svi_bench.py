"""Time the SVI step of ``vae`` against a hand-written PyTorch step with the same nets and estimator.

    vae-priors bench svi             # batch 128 and 1024, about a minute
    vae-priors bench svi --quick     # a short run (~15 s)
    vae-priors bench svi --profile   # + where the Pyro step spends its time

A (ours): the step of ``experiments.training.svi.fit`` -- ``Trace_ELBO()(model, guide)`` inside
``models.plate.subsample``, Adam, gradient clipping (``experiments.training.svi.svi_step``).
B (hand-written): the same modules (a copy with identical weights), the same single-sample reparameterized
estimator -(N/B) sum_n [log p(x_n|z_n) + log N(z_n; 0, I) - log q(z_n|x_n)] / N, z_n = mu + sigma * eps,
the same Adam and clipping.

A and B alternate (A B A B ...), each sample timing several consecutive steps; the ratio reported is the
median over the pairs of samples, so a slow phase of a shared machine hits both sides alike. Throughput
counts the matmul FLOPs of forward + backward (3x the forward's 2*B*in*out per linear layer) and is set
against the float32 ``torch.mm`` peak measured in the same run (best of 10, same threads).

On a machine whose cores other jobs share, ``--threads 1`` gives the steadier numbers: with two OpenMP
threads every parallel region waits for a descheduled partner (steps 5-15x slower, ratios meaningless).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import pyro
import torch
from torch import nn
from torch.nn import functional as F

from vae_priors.experiments.config import ModelConfig
from vae_priors.experiments.data.datasets import Dataset, Split
from vae_priors.experiments.registry import Pair, get_variant
from vae_priors.experiments.training.objectives import make_elbo
from vae_priors.experiments.training.svi import svi_step

X_DIM, HIDDEN, LATENT_DIM, NUM_POINTS, CLIP_NORM, LR = 784, [300, 300], 40, 60_000, 10.0, 1e-3


def build_pair(seed: int = 0) -> Pair:
    """The registry's ``vae`` for 784-dim binary input, 300-300 MLPs and 40 latent dims."""
    x = torch.zeros(2, X_DIM)
    data = Dataset("bench", Split(x), Split(x), Split(x))
    pyro.set_rng_seed(seed)
    return get_variant("vae").factory(data, ModelConfig(latent_dim=LATENT_DIM, hidden=HIDDEN), "bernoulli")


def linear_layers(module: nn.Module) -> list[nn.Linear]:
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


def step_flops(pair: Pair, batch_size: int) -> float:
    """Matmul FLOPs of one forward + backward: 3 x sum over linear layers of 2 * B * in * out."""
    layers = linear_layers(pair.guide) + linear_layers(pair.model)
    return 3.0 * sum(2.0 * batch_size * m.in_features * m.out_features for m in layers)


def pyro_step(pair: Pair, before: bool = False) -> Callable[[torch.Tensor, torch.Tensor], float]:
    """The step of ``experiments.training.svi.fit`` (which validates on its first step only); ``before``: the step as it
    was before tuning (Pyro validation in every step)."""
    objective = pair.objective(make_elbo("trace"))
    optimizer = torch.optim.Adam(objective.parameters(), lr=LR, foreach=True)  # as experiments.training.svi.fit
    return lambda x, index: svi_step(objective, optimizer, (x,), index, NUM_POINTS, beta=1.0, clip_norm=CLIP_NORM,
                                     validate=before)


def torch_step(pair: Pair) -> Callable[[torch.Tensor, torch.Tensor], float]:
    """The same estimator written out: encoder, reparameterized draw, decoder, the three log-densities."""
    encoder, decoder = pair.guide.net, pair.model.decoder
    params = list(encoder.parameters()) + list(decoder.parameters())
    optimizer = torch.optim.Adam(params, lr=LR, foreach=True)
    half_log_2pi = 0.5 * torch.log(torch.tensor(2 * torch.pi)).item()

    def step(x: torch.Tensor, index: torch.Tensor) -> float:
        loc, scale = encoder(x)
        z = loc + scale * torch.randn_like(loc)
        log_q = (-0.5 * ((z - loc) / scale).square() - scale.log() - half_log_2pi).sum(-1)
        log_p_z = (-0.5 * z.square() - half_log_2pi).sum(-1)
        log_lik = -F.binary_cross_entropy_with_logits(decoder(z), x, reduction="none").sum(-1)
        loss = -(log_lik + log_p_z - log_q).sum() * (NUM_POINTS / x.shape[0]) / NUM_POINTS
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP_NORM)
        optimizer.step()
        return loss.item()

    return step


def matmul_gflops(size: int = 2048, repeats: int = 10) -> float:
    """Best-of float32 ``torch.mm`` throughput (GFLOP/s) on this machine with the current threads."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best / 1e9


def interleaved(steps: dict[str, Callable], x: torch.Tensor, samples: int, steps_per_sample: int,
                warmup: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and process-CPU seconds per step of each callable, alternating A B A B ...

    CPU time is the steadier measure on a shared machine when one thread is used (with several, threads
    that spin while waiting for a descheduled partner inflate it)."""
    generator = torch.Generator().manual_seed(1)
    batch_size = x.shape[0]
    for step in steps.values():
        for _ in range(warmup):
            step(x, torch.randint(NUM_POINTS, (batch_size,), generator=generator))
    wall: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(samples):
        index = torch.randint(NUM_POINTS, (batch_size,), generator=generator)
        for name, step in steps.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(steps_per_sample):
                step(x, index)
            wall[name].append((time.perf_counter() - start) / steps_per_sample)
            cpu[name].append((time.process_time() - start_cpu) / steps_per_sample)
    return wall, cpu


def profile(step: Callable, x: torch.Tensor, rows: int = 25) -> None:
    """cProfile of the Python side of ``step`` (where the non-matmul time goes)."""
    import cProfile
    import pstats

    index = torch.arange(x.shape[0])
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(50):
        step(x, index)
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(rows)


def _median_ratio(times: dict[str, list[float]]) -> str:
    ratios = [a / b for a, b in zip(times["pyro"], times["torch"], strict=True)]
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return f"{statistics.median(ratios):.3f} (IQR {q1:.3f}-{q3:.3f})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run: fewer samples")
    parser.add_argument("--profile", action="store_true", help="cProfile the Pyro step at the smallest batch")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 1024])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads (default: what torch chose on this machine)")
    parser.add_argument("--before", action="store_true",
                        help="the step before tuning: Pyro validation on in every step")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, pyro {pyro.__version__}, threads {torch.get_num_threads()}"
          f"{', before tuning' if args.before else ''}")
    peak = matmul_gflops()
    print(f"float32 torch.mm 2048x2048 peak: {peak:.1f} GFLOP/s")
    for batch_size in args.batch_sizes:
        pair = build_pair()
        steps = {"pyro": pyro_step(pair, args.before), "torch": torch_step(copy.deepcopy(pair))}
        x = torch.bernoulli(torch.full((batch_size, X_DIM), 0.3))
        per_sample = max(1, (1024 if args.quick else 2048) // batch_size)
        wall, cpu = interleaved(steps, x, samples=7 if args.quick else 21, steps_per_sample=per_sample,
                                warmup=5 if args.quick else 20)
        flops = step_flops(pair, batch_size)
        print(f"batch {batch_size}: median ratio pyro/torch, wall {_median_ratio(wall)}, cpu {_median_ratio(cpu)}")
        for name, t in wall.items():
            sec = statistics.median(t)
            gflops = flops / sec / 1e9
            print(f"  {name:5s} {sec * 1e3:7.2f} ms/step (cpu {statistics.median(cpu[name]) * 1e3:7.2f} ms)  "
                  f"{gflops:6.1f} GFLOP/s = {100 * gflops / peak:3.0f}% of peak")
        if args.profile and batch_size == min(args.batch_sizes):
            profile(steps["pyro"], x)
    print(f"float32 torch.mm peak after the run: {matmul_gflops():.1f} GFLOP/s")


if __name__ == "__main__":
    main()
