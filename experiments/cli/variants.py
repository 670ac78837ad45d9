"""``vae-priors list``: the registered variants, one per line."""

from __future__ import annotations

import argparse

from vae_priors.experiments.registry import VARIANTS, import_pairs


def command_list(args: argparse.Namespace) -> int:
    import_pairs(args.imports)
    width = max(len(name) for name in VARIANTS)
    for variant in VARIANTS.values():
        kind = "p(y|x)" if variant.conditional else "p(x)  "
        print(f"{variant.name:<{width}}  {kind}  {variant.description}")
    return 0
