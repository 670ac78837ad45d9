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
    from vae_priors.experiments.runs.diagnose import diagnose_run

    if args.particles is not None and args.particles <= 0:
        raise UsageError(f"--particles must be > 0 (importance draws per test point), got {args.particles}")
    progress = not args.quiet and sys.stderr.isatty()
    variants = None if args.variants is None else variant_names(args.variants)
    table = diagnose_run(args.run_dir, num_particles=args.particles, variants=variants, imports=args.imports,
                         overwrite=args.overwrite, progress=progress)
    print(format_diagnostics(table))
    print(f"\nall columns: {Path(args.run_dir) / 'diagnostics.csv'}; explained in {Path(args.run_dir) / 'report.html'}")
    return 0
