"""``vae-priors``: train, evaluate and diagnose the registered variants.

    vae-priors run [CONFIG.toml]   train + evaluate every variant (default: the embedded digits), then diagnose
    vae-priors run --resume DIR    finish a run that was stopped (Ctrl-C, kill, a full disk)
    vae-priors list                the registered variants
    vae-priors diagnose RUN_DIR    (re)compute the diagnostics of a run directory
    vae-priors check MODULE:FACTORY  does a pair of yours meet the model/guide contract?
    vae-priors findings RUN_DIR    paired comparisons of a run's variants, from its per-point results
    vae-priors data fetch NAME DIR download a data set (mnist, binarized-mnist) and verify its SHA-256
    vae-priors bench NAME          benchmarks: svi, mixture-prior, exemplar-staleness, exemplar-heads, diagnostics,
                                   evaluation

This module only parses arguments: each command lives in its own module of this package and is imported when it
runs, so ``vae-priors --help`` answers without importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import signal
import sys
import threading
from importlib.metadata import PackageNotFoundError, version

BENCHMARKS = ("diagnostics", "evaluation", "exemplar-heads", "exemplar-staleness", "mixture-prior", "svi")


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
    run.add_argument("--resume", metavar="RUN_DIR", help="finish a stopped run: skip its finished variants, continue "
                     "the interrupted one from its checkpoint, train the rest (settings come from RUN_DIR/config.toml)")
    run.add_argument("--out", help="run directory to create (default: runs/DATA-seedN-TIMESTAMP); must not exist")
    run.add_argument("--seed", type=int, help="overrides the config's seed")
    run.add_argument("--epochs", type=int, help="overrides svi.epochs")
    run.add_argument("--max-minutes", type=float, dest="max_minutes",
                     help="overrides svi.max_minutes (training-time budget per variant; the epochs it allowed are "
                     "recorded in metrics.csv, and --epochs with that number repeats the run); with --resume it may "
                     "change: a raised budget continues the variants that stopped by time)")
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
    diag.add_argument("--threads", type=int, help="torch threads for this process (default: the run's threads "
                      "setting, else the available cores divided by the processes torchrun starts on this machine)")
    diag.add_argument("--quiet", action="store_true")
    diag.set_defaults(func=_command("diagnose", "command_diagnose"))
    data = sub.add_parser("data", help="data sets: download and verify")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    fetch = data_sub.add_parser("fetch", help="download a data set's files into DIR, checking their SHA-256")
    fetch.add_argument("name", help="mnist or binarized-mnist")
    fetch.add_argument("dir", help="folder to put the files in (then set data.path to it)")
    fetch.add_argument("--base-url", help="a mirror to download from instead of the original server")
    fetch.set_defaults(func=_command("data", "command_fetch"))
    found = sub.add_parser("findings", help="paired findings of a run, from its per-point test results")
    found.add_argument("run_dir")
    found.set_defaults(func=_command("findings", "command_findings"))
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
    """Parse, run one command, and turn any failure into one line on stderr (the traceback with VAE_PRIORS_DEBUG=1).

    Exit status: 0 done, 2 bad input (arguments, config, data or run files), 1 any other failure, 130 Ctrl-C,
    143 SIGTERM (``kill``, a scheduler, or torchrun stopping the other ranks when one fails).
    """
    args = parser().parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the same `finally` blocks remove half-made outputs (a diagnostics work
    # folder, a temporary file) instead of the process vanishing mid-write.
    previous = signal.signal(signal.SIGTERM, _terminate) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        return args.func(args)
    except (Exception, KeyboardInterrupt) as err:
        if os.environ.get("VAE_PRIORS_DEBUG"):
            raise
        message, status = describe(err)
        stopped = status in (EXIT_INTERRUPTED, EXIT_TERMINATED)
        print(f"vae-priors: {'interrupted' if stopped else 'error'}: {message}", file=sys.stderr)
        return status
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: raised in the main thread so that cleanup runs as for Ctrl-C."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated()


EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 1, 2, 130, 143
DEBUG_HINT = "rerun with VAE_PRIORS_DEBUG=1 to see the traceback"


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""


def variant_names(text: str) -> list[str]:
    """The names in a ``--variants a,b`` argument; naming none (``--variants ,``) is an error, not "all"."""
    names = [v.strip() for v in text.split(",") if v.strip()]
    if not names:
        raise UsageError(f"--variants {text!r} names no variant; pass comma-separated names (see `vae-priors list`), "
                         "or leave --variants out for all of them")
    return names


def describe(err: BaseException) -> tuple[str, int]:
    """One line saying what failed, the file or setting involved and the fix, and the exit status."""
    message, status = _classify(err)
    run_dir = getattr(err, "run_dir", None)  # set by `run` once its directory exists
    if run_dir is not None:
        message += (f"; {run_dir} keeps every finished variant and the last checkpoint (written each epoch): "
                    f"finish the run with `vae-priors run --resume {shlex.quote(str(run_dir))}`")
    return " ".join(message.split()), status


def _classify(err: BaseException) -> tuple[str, int]:
    if isinstance(err, Terminated):
        return "stopped by SIGTERM", EXIT_TERMINATED
    if isinstance(err, KeyboardInterrupt):
        return "stopped by Ctrl-C", EXIT_INTERRUPTED
    if _is(err, "vae_priors.experiments.training.svi", "NonFiniteLossError"):
        return _text(err), EXIT_FAILURE  # the message names the variant, epoch, checkpoint and the fix
    if isinstance(err, UnicodeDecodeError):  # a reader that did not name its file
        return (f"a text input is not UTF-8 ({err.reason} at byte {err.start}); save configs and .amat files as "
                f"UTF-8 text"), EXIT_USAGE
    if isinstance(err, (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)):
        return _os_text(err, "check the path"), EXIT_USAGE
    if isinstance(err, PermissionError):
        return _os_text(err, "choose a path you may write to, or change its permissions"), EXIT_FAILURE
    if isinstance(err, OSError):
        return _os_text(err, "check the path and the free disk space"), EXIT_FAILURE
    if isinstance(err, EOFError) or type(err).__name__ in ("BadZipFile", "UnpicklingError"):
        return (f"a file ended early or is not in the expected format ({type(err).__name__}: {_text(err)}); it is "
                f"truncated or damaged -- restore it ({DEBUG_HINT} to see which)"), EXIT_USAGE
    # ConfigError and FileFormatError are ValueErrors; ModuleNotFoundError: a module named by --import
    if isinstance(err, (UsageError, ValueError, KeyError, ModuleNotFoundError)):
        return _text(err), EXIT_USAGE
    return f"unexpected {type(err).__name__}: {_text(err)} ({DEBUG_HINT}, and please report it)", EXIT_FAILURE


def _is(err: BaseException, module: str, name: str) -> bool:
    """``isinstance(err, module.name)`` without importing ``module`` (the CLI parses without torch)."""
    cls = getattr(sys.modules.get(module), name, None)
    return cls is not None and isinstance(err, cls)


def _text(err: BaseException) -> str:
    return str(err.args[0]) if len(err.args) == 1 else str(err) or type(err).__name__


def _os_text(err: OSError, fix: str) -> str:
    """An ``OSError`` from the operating system names its path; our own carry a full message."""
    if err.filename is None:
        return _text(err)
    return f"{err.strerror or type(err).__name__}: {err.filename}; {fix}"


if __name__ == "__main__":
    sys.exit(main())
