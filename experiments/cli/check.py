"""``vae-priors check MODULE:FACTORY`` (or a registered variant name): does a pair meet the contract?

The pair is built on the embedded digits with the default model settings and traced on one minibatch as the SVI
loop would (``training.contract.check_pair``); a violation is one line naming the site and the fix.
"""

from __future__ import annotations

import argparse
import importlib

import torch

from vae_priors.experiments.cli import UsageError
from vae_priors.experiments.config import RunConfig
from vae_priors.experiments.registry import VARIANTS, import_pairs
from vae_priors.experiments.runs.layout import load_run_data
from vae_priors.experiments.training.contract import check_pair

BATCH = 32


def _factory(target: str, imports: list[str]):
    """(name, factory, conditional) for ``MODULE:FACTORY`` or a registered variant name."""
    module, sep, attr = target.partition(":")
    if not sep:
        import_pairs(imports)
        if target not in VARIANTS:
            raise UsageError(f"{target!r} is neither MODULE:FACTORY nor a registered variant (`vae-priors list`)")
        spec = VARIANTS[target]
        return spec.name, spec.factory, spec.conditional
    import_pairs([*imports, module])
    factory = getattr(importlib.import_module(module), attr, None)
    if not callable(factory):
        raise UsageError(f"{module} has no callable {attr!r}; pass MODULE:FACTORY where FACTORY(data, model_config, "
                         "likelihood) returns a Pair")
    spec = next((v for v in VARIANTS.values() if v.factory is factory), None)
    return target, factory, spec.conditional if spec else False


def command_check(args: argparse.Namespace) -> int:
    name, factory, conditional = _factory(args.target, args.imports)
    config = RunConfig()
    dataset = load_run_data(config.data).for_variant(conditional or args.conditional)
    pair = factory(dataset, config.model, config.data.likelihood)
    index = torch.arange(BATCH)
    check_pair(pair.model, pair.guide, dataset.train.tensors(index), index, len(dataset.train))
    print(f"ok: {name} meets the model/guide contract (one latent site 'z' with matching event shapes, the model's "
          f"observed site and 'z' in the loop's subsampled \"data\" plate; traced on {BATCH} of "
          f"{len(dataset.train)} points of {dataset.name})")
    return 0
