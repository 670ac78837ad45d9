"""``vae-priors diagnose RUN_DIR``: (re)compute the diagnostics of a run directory and print the headline table."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from vae_priors.experiments.cli import UsageError, variant_names

SUMMARY_COLUMNS = {"log_lik": "log-lik", "elbo": "ELBO", "mean_kl": "mean KL", "mutual_info": "I(x;z)",
                   "kl_qagg_p": "KL(qagg|p)", "kl_p_qagg": "KL(p|qagg)", "prior_hole_share": "holes",
                   "active_units": "active", "khat_above": "khat>thr", "fd_prior": "FD p(z)",
                   "fd_q_agg": "FD qagg", "fd_gmm": "FD GMM", "amortization_gap": "amort.gap"}


def format_diagnostics(table: pd.DataFrame) -> str:
    """The headline columns of diagnostics.csv as a terminal table (report.html explains every column)."""
    shown = table[["variant", *[c for c in SUMMARY_COLUMNS if c in table.columns]]].rename(columns=SUMMARY_COLUMNS)
    return shown.to_string(index=False, na_rep="-", float_format=lambda v: f"{v:.3g}")


def command_diagnose(args: argparse.Namespace) -> int:
    """Under ``torchrun --nproc_per_node=W`` the ranks share the work (``runs.diagnose``); rank 0 writes and prints."""
    from vae_priors.experiments import config as configs
    from vae_priors.experiments.runs.diagnose import diagnose_run
    from vae_priors.experiments.runtime import set_threads
    from vae_priors.experiments.training import distributed

    if args.particles is not None and args.particles <= 0:
        raise UsageError(f"--particles must be > 0 (importance draws per test point), got {args.particles}")
    if args.threads is not None and args.threads <= 0:
        raise UsageError(f"--threads must be > 0 (torch threads for this process), got {args.threads}")
    config_path = Path(args.run_dir) / "config.toml"
    config = configs.load(config_path) if config_path.is_file() else None  # diagnose_run names a missing one
    set_threads(args.threads or (config.threads if config else 0))
    progress = not args.quiet and sys.stderr.isatty()
    variants = None if args.variants is None else variant_names(args.variants)
    distributed.init_from_environment(config.svi.device if config else "cpu")  # under torchrun; else a no-op
    try:
        table = diagnose_run(args.run_dir, num_particles=args.particles, variants=variants, imports=args.imports,
                             overwrite=args.overwrite, progress=progress)
        if distributed.is_main():
            print(format_diagnostics(table))
            print(f"\nall columns: {Path(args.run_dir) / 'diagnostics.csv'}; explained in "
                  f"{Path(args.run_dir) / 'report.html'}")
        distributed.barrier()  # all ranks done before gloo's connections close (not on failure: it would wait)
    finally:
        distributed.shutdown()
    return 0
