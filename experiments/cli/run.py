"""``vae-priors run [CONFIG]``: train and evaluate every variant of a config, then diagnose them."""

from __future__ import annotations

import argparse
import math
import sys
import time
from datetime import datetime
from pathlib import Path

import pandas as pd
import tomli_w
import torch

from vae_priors.experiments import config as configs
from vae_priors.experiments.cli import UsageError
from vae_priors.experiments.config import RunConfig
from vae_priors.experiments.evaluation.importance import evaluate
from vae_priors.experiments.files import save_torch, write_csv, write_text
from vae_priors.experiments.registry import VARIANTS, get_variant, import_pairs
from vae_priors.experiments.runs.layout import (
    build_pair,
    load_run_data,
    pointwise_path,
    save_pair,
    test_guide_path,
    write_findings,
    write_pointwise,
)
from vae_priors.experiments.runtime import provenance, set_threads
from vae_priors.experiments.training.svi import fit


def _resolve_config(args: argparse.Namespace) -> RunConfig:
    config = configs.load(args.config) if args.config else RunConfig()
    if args.seed is not None:
        config.seed = args.seed
    if args.epochs is not None:
        config.svi.epochs = args.epochs
    if args.particles is not None:
        config.eval.num_particles = args.particles
    if args.threads is not None:
        config.threads = args.threads
    config.imports = list(dict.fromkeys([*config.imports, *args.imports]))  # recorded in the run's config.toml
    import_pairs(config.imports)
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


def command_run(args: argparse.Namespace) -> int:
    config = _resolve_config(args)
    threads = set_threads(config.threads)
    data = load_run_data(config.data)  # bad data fails here, before anything is written
    run_dir = _new_run_dir(args, config)
    write_text(run_dir / "config.toml", configs.dumps(config))
    write_text(run_dir / "provenance.toml", tomli_w.dumps(provenance(threads)))
    print(f"run directory: {run_dir}")
    histories, metrics, pointwise = [], [], {}
    for name in config.variants:
        pair, dataset = build_pair(config, data, name)
        start = time.perf_counter()
        result = fit(pair, dataset, config.svi, seed=config.seed, checkpoint=run_dir / "checkpoints" / f"{name}.pt",
                     name=name, progress=None if not args.quiet else False)
        fit_seconds = time.perf_counter() - start
        save_pair(pair, run_dir / "pairs" / f"{name}.pt")
        evaluation = evaluate(pair, dataset.test.to(config.svi.device),
                              config.eval.num_particles, config.eval.local_refit_steps, seed=config.seed)
        pointwise[name] = write_pointwise(evaluation, pointwise_path(run_dir, name))
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
        found = write_findings(run_dir, pointwise)
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
    if len(found):
        print(f"\nFindings (paired differences over the same {found.n_points.iloc[0]} test points; "
              f"{run_dir / 'findings.csv'}):")
        for row in found.itertuples():
            print(f"  {row.question}\n    {row.finding}")
    if config.diagnose and not args.no_diagnose:
        from vae_priors.experiments.cli.diagnose import format_diagnostics
        from vae_priors.experiments.runs.diagnose import diagnose_run

        diagnostics = diagnose_run(run_dir, progress=not args.quiet and sys.stderr.isatty())
        print(f"\nDiagnostics ({run_dir / 'diagnostics.csv'}, report: {run_dir / 'report.html'}):")
        print(format_diagnostics(diagnostics))
    print(f"\nwrote {run_dir}")
    return 0
