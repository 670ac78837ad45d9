"""``vae-priors findings RUN_DIR``: the paired findings of a run, recomputed from its per-point test results.

``run`` and ``diagnose`` write ``findings.csv`` themselves; this command (re)writes it from ``pointwise/*.csv``
alone -- no model is loaded -- for a run made before findings existed, or after variants were added.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vae_priors.experiments.cli import UsageError
from vae_priors.experiments.runs.layout import read_pointwise, write_findings


def command_findings(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    names = sorted(p.stem for p in (run_dir / "pointwise").glob("*.csv"))
    if not names:
        raise UsageError(f"{run_dir / 'pointwise'} holds no per-point results; pass a run directory whose "
                         "variants were evaluated by `vae-priors run`")
    found = write_findings(run_dir, read_pointwise(run_dir, names))
    if not len(found):
        print(f"no question could be answered from {', '.join(names)}: no compared pair was trained in this run")
    for row in found.itertuples():
        print(f"{row.question}\n  {row.finding}")
    print(f"\nwrote {run_dir / 'findings.csv'}")
    return 0
