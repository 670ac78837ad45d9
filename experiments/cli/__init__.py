"""``vae-priors``: train, evaluate and diagnose the registered variants.

    vae-priors run [CONFIG.toml]   train + evaluate every variant (default: the embedded digits), then diagnose
    vae-priors list                the registered variants
    vae-priors diagnose RUN_DIR    (re)compute the diagnostics of a run directory
    vae-priors check MODULE:FACTORY  does a pair of yours meet the model/guide contract?
    vae-priors bench NAME          benchmarks: svi, mixture-prior, diagnostics

This module only parses arguments: each command lives in its own module of this package and is imported when it
runs, so ``vae-priors --help`` answers without importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from importlib.metadata import PackageNotFoundError, version

BENCHMARKS = ("diagnostics", "mixture-prior", "svi")


def _version() -> str:
    try:
        return version("vae-priors")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown (not installed)"


def _command(module: str, function: str):
    """A lazy reference to ``vae_priors.experiments.cli.<module>.<function>``."""

    def call(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(f"vae_priors.experiments.cli.{module}"), function)(args)

    return call


def _import_option(command: argparse.ArgumentParser) -> None:
    command.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                         help="a module of yours that registers pairs (repeatable); found on sys.path or in the "
                              "current directory; a run records it, so `diagnose` finds the pairs again")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="vae-priors",
                                  description="Train, evaluate and diagnose Pyro VAE model/guide pairs.")
    top.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = top.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train, evaluate and diagnose variants")
    run.add_argument("config", nargs="?", help="TOML config (default: the quick start on the embedded digits)")
    run.add_argument("--out", help="run directory to create (default: runs/DATA-seedN-TIMESTAMP); must not exist")
    run.add_argument("--seed", type=int, help="overrides the config's seed")
    run.add_argument("--epochs", type=int, help="overrides svi.epochs")
    run.add_argument("--particles", type=int, help="overrides eval.num_particles (importance draws per test point)")
    run.add_argument("--threads", type=int, help="torch threads for this process (overrides the config's threads; "
                     "default: the available cores divided by the processes torchrun starts on this machine)")
    run.add_argument("--variants", help="comma-separated variant names (default: all; see `vae-priors list`)")
    _import_option(run)
    run.add_argument("--no-diagnose", action="store_true", help="skip the diagnostics after training")
    run.add_argument("--quiet", action="store_true", help="no progress output")
    run.set_defaults(func=_command("run", "command_run"))
    listing = sub.add_parser("list", help="list the registered variants")
    _import_option(listing)
    listing.set_defaults(func=_command("variants", "command_list"))
    diag = sub.add_parser("diagnose", help="diagnostics for a run directory")
    diag.add_argument("run_dir")
    diag.add_argument("--particles", type=int, help="importance samples per point (default: the run's eval setting)")
    diag.add_argument("--variants", help="comma-separated variants to diagnose (default: every trained one)")
    _import_option(diag)
    diag.add_argument("--overwrite", action="store_true", help="replace existing diagnostics outputs")
    diag.add_argument("--quiet", action="store_true")
    diag.set_defaults(func=_command("diagnose", "command_diagnose"))
    check = sub.add_parser("check", help="check that a pair meets the model/guide contract")
    check.add_argument("target", help="MODULE:FACTORY (FACTORY(data, model_config, likelihood) -> Pair) or a variant")
    check.add_argument("--conditional", action="store_true", help="build it on the quadrant task (p(y|x) pairs)")
    _import_option(check)
    check.set_defaults(func=_command("check", "command_check"))
    bench = sub.add_parser("bench", help="run a benchmark")
    bench.add_argument("name", choices=BENCHMARKS)
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")
    bench.set_defaults(func=_command("bench", "command_bench"))
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from vae_priors.experiments.config import ConfigError  # light: stdlib and tomli_w only

    try:
        return args.func(args)
    except (UsageError, ConfigError, FileNotFoundError, FileExistsError, ValueError, KeyError,
            ModuleNotFoundError) as err:
        if os.environ.get("VAE_PRIORS_DEBUG"):
            raise
        message = err.args[0] if err.args else str(err)
        print(f"vae-priors: error: {message}", file=sys.stderr)
        return 2


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""


if __name__ == "__main__":
    sys.exit(main())
