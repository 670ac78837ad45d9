"""``vae-priors bench NAME [ARGS]``: run one of the measurement scripts in ``experiments/benchmarks``."""

from __future__ import annotations

import argparse
import importlib

MODULES = {"svi": "svi_bench", "mixture-prior": "mixture_prior_bench", "diagnostics": "diagnostics_bench",
           "evaluation": "evaluation_bench", "exemplar-staleness": "exemplar_staleness",
           "exemplar-heads": "exemplar_heads"}


def command_bench(args: argparse.Namespace) -> int:
    module = importlib.import_module(f"vae_priors.experiments.benchmarks.{MODULES[args.name]}")
    return module.main(args.bench_args) or 0
