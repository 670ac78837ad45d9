"""Wall time of the held-out evaluation (importance-sampled log-likelihood) of one trained pair, with 1 or W
processes (issue 11: 10 000 MNIST test points with 1 000 draws).

    vae-priors bench evaluation RUN_DIR [--variant vae] [--particles 1000]
    torchrun --standalone --nproc_per_node=2 $(which vae-priors) bench evaluation RUN_DIR ...

Loads ``RUN_DIR/pairs/VARIANT.pt`` and its data as ``vae-priors run`` wrote them, then times ``evaluate`` on the
whole test split; under torchrun every rank weighs its share of the points and the log weights are gathered
(``experiments/evaluation/importance.py``). Rank 0 prints the time, the processes and threads, and the estimate
(with W processes the draws differ from one process's: the estimates agree within their Monte Carlo error).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from vae_priors.experiments.evaluation.importance import evaluate
from vae_priors.experiments.runs.layout import load_pair, load_run, write_pointwise
from vae_priors.experiments.runtime import set_threads
from vae_priors.experiments.training import distributed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a directory written by `vae-priors run`")
    parser.add_argument("--variant", default="vae")
    parser.add_argument("--particles", type=int, default=1000, help="importance draws per test point")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per process (0: cores / processes)")
    parser.add_argument("--pointwise", type=Path, help="also write the per-point results (as RUN_DIR/pointwise/"
                        "VARIANT.csv) to this file, e.g. to pair them with another run's in `vae-priors findings`")
    args = parser.parse_args(argv)
    if args.pointwise and args.pointwise.exists():
        parser.error(f"{args.pointwise} exists; pass a new file (nothing is overwritten)")
    threads = set_threads(args.threads)
    distributed.init_from_environment("cpu")
    try:
        config, data = load_run(args.run_dir)
        pair, dataset = load_pair(args.run_dir, args.variant, config, data)
        distributed.barrier()  # every rank loaded: time the evaluation alone
        start = time.perf_counter()
        result = evaluate(pair, dataset.test, args.particles, config.eval.local_refit_steps, seed=config.seed)
        seconds = time.perf_counter() - start
        if distributed.is_main():
            summary = result.summary()
            rank, size = distributed.world()
            print(f"{args.variant}: {len(dataset.test)} test points x {args.particles} draws, {size} process(es) x "
                  f"{threads} thread(s), torch {torch.__version__}: {seconds:.1f} s; test log-lik "
                  f"{summary['test_log_lik']:.3f} ± {summary['test_log_lik_se']:.3f}")
            if args.pointwise:
                write_pointwise(result, args.pointwise)
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main()
