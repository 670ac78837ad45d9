"""``vae-priors data fetch NAME DIR``: download a data set and verify it (``experiments.data.fetch``)."""

from __future__ import annotations

import argparse

from vae_priors.experiments.data.fetch import fetch


def command_fetch(args: argparse.Namespace) -> int:
    paths = fetch(args.name, args.dir, base_url=args.base_url)
    print(f"{args.name}: {len(paths)} files in {args.dir}; use them with data.name = {args.name!r}, "
          f"data.path = {str(args.dir)!r}")
    return 0
