"""``vae-priors``: train, evaluate and diagnose the registered variants.

    vae-priors run [CONFIG.toml]   train + evaluate every variant (default: the embedded digits), then diagnose
    vae-priors list                the registered variants
    vae-priors diagnose RUN_DIR    (re)compute the diagnostics of a run directory
    vae-priors bench NAME          benchmarks: svi, mixture-prior, diagnostics
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from datetime import datetime
from pathlib import Path

import pandas as pd
import torch

from experiments import config as configs
from experiments.config import ConfigError, RunConfig
from experiments.evaluation import evaluate
from experiments.files import save_torch, write_csv, write_text
from experiments.registry import VARIANTS, get_variant
from experiments.runs import build_pair, load_run_data, save_pair, test_guide_path
from experiments.svi import fit

BENCHMARKS = {"svi": "experiments.benchmarks.svi_bench", "mixture-prior": "experiments.benchmarks.mixture_prior_bench",
              "diagnostics": "experiments.benchmarks.diagnostics_bench"}


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""


def _resolve_config(args: argparse.Namespace) -> RunConfig:
    config = configs.load(args.config) if args.config else RunConfig()
    if args.seed is not None:
        config.seed = args.seed
    if args.epochs is not None:
        config.svi.epochs = args.epochs
    if args.variants:
        config.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not config.variants:
        config.variants = list(VARIANTS)
    configs.check(config)
    if config.svi.device == "cuda" and not torch.cuda.is_available():
        raise UsageError('svi.device = "cuda" but torch sees no CUDA device; use device = "cpu"')
    for name in config.variants:
        try:
            get_variant(name)
        except KeyError as err:
            raise UsageError(err.args[0]) from None
    return config


def _new_run_dir(args: argparse.Namespace, config: RunConfig) -> Path:
    if args.out:
        out = Path(args.out)
    else:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        out = Path("runs") / f"{config.data.name}-seed{config.seed}-{stamp}"
    if out.exists():
        raise UsageError(f"run directory {out} already exists; pass a new --out DIR (runs are never overwritten)")
    out.mkdir(parents=True)
    return out


def _format_table(metrics: pd.DataFrame) -> str:
    def pm(mean: float, se: float) -> str:
        return "nan" if math.isnan(mean) else f"{mean:8.2f} ± {se:.2f}"

    rows = [{"variant": r.variant, "target": "log p(y|x)" if r.conditional else "log p(x)",
             "epochs": r.epochs, "best": r.best_epoch, "test ELBO": pm(r.test_elbo, r.test_elbo_se),
             "test log-lik (IS)": pm(r.test_log_lik, r.test_log_lik_se), "fit s": f"{r.fit_seconds:.1f}"}
            for r in metrics.itertuples()]
    return pd.DataFrame(rows).to_string(index=False)


SUMMARY_COLUMNS = {"log_lik": "log-lik", "elbo": "ELBO", "mean_kl": "mean KL", "mutual_info": "I(x;z)",
                   "kl_qagg_p": "KL(qagg|p)", "kl_p_qagg": "KL(p|qagg)", "prior_hole_share": "holes",
                   "active_units": "active", "khat_above": "khat>thr", "fd_prior": "FD p(z)",
                   "fd_q_agg": "FD qagg", "fd_gmm": "FD GMM", "amortization_gap": "amort.gap"}


def format_diagnostics(table: pd.DataFrame) -> str:
    """The headline columns of diagnostics.csv as a terminal table (report.html explains every column)."""
    shown = table[["variant", *[c for c in SUMMARY_COLUMNS if c in table.columns]]].rename(columns=SUMMARY_COLUMNS)
    return shown.to_string(index=False, na_rep="-", float_format=lambda v: f"{v:.3g}")


def command_run(args: argparse.Namespace) -> int:
    config = _resolve_config(args)
    data = load_run_data(config.data)  # bad data fails here, before anything is written
    run_dir = _new_run_dir(args, config)
    write_text(run_dir / "config.toml", configs.dumps(config))
    print(f"run directory: {run_dir}")
    histories, metrics = [], []
    for name in config.variants:
        pair, dataset = build_pair(config, data, name)
        start = time.perf_counter()
        result = fit(pair, dataset, config.svi, seed=config.seed, checkpoint=run_dir / "checkpoints" / f"{name}.pt",
                     name=name, progress=None if not args.quiet else False)
        fit_seconds = time.perf_counter() - start
        save_pair(pair, run_dir / "pairs" / f"{name}.pt")
        evaluation = evaluate(pair, dataset.test.to(config.svi.device),
                              config.eval.num_particles, config.eval.local_refit_steps, seed=config.seed)
        if evaluation.guide is not pair.guide:  # a per-point guide fitted on the test points: diagnose reuses it
            save_torch(evaluation.guide.state_dict(), test_guide_path(run_dir, name))
        histories.append(result.history.assign(variant=name))
        metrics.append({"variant": name, "conditional": get_variant(name).conditional, "data": dataset.name,
                        "epochs": len(result.history), "best_epoch": result.best_epoch, "monitor": result.monitor,
                        "best_elbo": result.best_elbo, **evaluation.summary(),
                        "num_particles": config.eval.num_particles, "fit_seconds": fit_seconds,
                        "eval_seconds": time.perf_counter() - start - fit_seconds, "note": evaluation.note})
        # Written after every variant: a failure later keeps what is finished.
        history = pd.concat(histories, ignore_index=True)
        write_csv(run_dir / "history.csv", history[["variant", *result.history.columns]])
        write_csv(run_dir / "metrics.csv", pd.DataFrame(metrics))
        if args.quiet is False:
            print(f"  {name}: {len(result.history)} epochs, test log-lik {metrics[-1]['test_log_lik']:.2f} "
                  f"({fit_seconds:.1f} s)", file=sys.stderr)
    table = pd.DataFrame(metrics)
    print(f"\nHeld-out results on {config.data.name} (per data point; IS = importance sampling with "
          f"{config.eval.num_particles} draws; conditional variants predict the hidden quadrants):")
    print(_format_table(table))
    notes = [f"  {r.variant}: {r.note}" for r in table.itertuples() if r.note]
    if notes:
        print("notes:\n" + "\n".join(notes))
    if config.diagnose and not args.no_diagnose:
        from experiments.diagnose import diagnose_run

        diagnostics = diagnose_run(run_dir, progress=not args.quiet and sys.stderr.isatty())
        print(f"\nDiagnostics ({run_dir / 'diagnostics.csv'}, report: {run_dir / 'report.html'}):")
        print(format_diagnostics(diagnostics))
    print(f"\nwrote {run_dir}")
    return 0


def command_list(args: argparse.Namespace) -> int:
    width = max(len(name) for name in VARIANTS)
    for variant in VARIANTS.values():
        kind = "p(y|x)" if variant.conditional else "p(x)  "
        print(f"{variant.name:<{width}}  {kind}  {variant.description}")
    return 0


def command_diagnose(args: argparse.Namespace) -> int:
    from experiments.diagnose import diagnose_run

    progress = not args.quiet and sys.stderr.isatty()
    table = diagnose_run(args.run_dir, num_particles=args.particles, overwrite=args.overwrite, progress=progress)
    print(format_diagnostics(table))
    print(f"\nall columns: {Path(args.run_dir) / 'diagnostics.csv'}; explained in {Path(args.run_dir) / 'report.html'}")
    return 0


def command_bench(args: argparse.Namespace) -> int:
    import importlib

    module = importlib.import_module(BENCHMARKS[args.name])
    return module.main(args.bench_args) or 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="vae-priors", description=__doc__.split("\n")[0])
    sub = top.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train, evaluate and diagnose variants")
    run.add_argument("config", nargs="?", help="TOML config (default: the quick start on the embedded digits)")
    run.add_argument("--out", help="run directory to create (default: runs/DATA-seedN-TIMESTAMP); must not exist")
    run.add_argument("--seed", type=int, help="overrides the config's seed")
    run.add_argument("--epochs", type=int, help="overrides svi.epochs")
    run.add_argument("--variants", help="comma-separated variant names (default: all; see `vae-priors list`)")
    run.add_argument("--no-diagnose", action="store_true", help="skip the diagnostics after training")
    run.add_argument("--quiet", action="store_true", help="no progress output")
    run.set_defaults(func=command_run)
    sub.add_parser("list", help="list the registered variants").set_defaults(func=command_list)
    diag = sub.add_parser("diagnose", help="diagnostics for a run directory")
    diag.add_argument("run_dir")
    diag.add_argument("--particles", type=int, help="importance samples per point (default: the run's eval setting)")
    diag.add_argument("--overwrite", action="store_true", help="replace existing diagnostics outputs")
    diag.add_argument("--quiet", action="store_true")
    diag.set_defaults(func=command_diagnose)
    bench = sub.add_parser("bench", help="run a benchmark")
    bench.add_argument("name", choices=sorted(BENCHMARKS))
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")
    bench.set_defaults(func=command_bench)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, ConfigError, FileNotFoundError, FileExistsError, ValueError, KeyError) as err:
        if os.environ.get("VAE_PRIORS_DEBUG"):
            raise
        message = err.args[0] if err.args else str(err)
        print(f"vae-priors: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
