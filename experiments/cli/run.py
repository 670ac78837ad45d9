"""``vae-priors run [CONFIG]``: train and evaluate every variant of a config, then diagnose them.

``vae-priors run --resume RUN_DIR`` finishes a run that was stopped: variants in metrics.csv are kept, a variant
with a checkpoint continues from it (bit for bit), the rest are trained; the files are those of a fresh run.

Under ``torchrun --nproc_per_node=W`` every rank trains (``training.distributed``: each its shard of every batch);
rank 0 alone creates the run directory and writes checkpoints, CSVs and the report; the evaluation and the
diagnostics are split over all ranks by points (``evaluation.importance``, ``runs.diagnose``).
"""

from __future__ import annotations

import argparse
import math
import shlex
import shutil
import sys
import time
from datetime import datetime
from pathlib import Path

import pandas as pd
import tomli_w
import torch

from vae_priors.experiments import config as configs
from vae_priors.experiments.cli import UsageError, variant_names
from vae_priors.experiments.config import RunConfig
from vae_priors.experiments.data.datasets import Dataset
from vae_priors.experiments.evaluation.importance import evaluate
from vae_priors.experiments.files import FileFormatError, save_torch, write_csv, write_text
from vae_priors.experiments.registry import VARIANTS, Pair, get_variant, import_pairs
from vae_priors.experiments.runs.layout import (
    build_pair,
    load_run_data,
    pointwise_path,
    read_pointwise,
    save_pair,
    test_guide_path,
    write_findings,
    write_pointwise,
)
from vae_priors.experiments.runtime import provenance, set_threads
from vae_priors.experiments.training import distributed
from vae_priors.experiments.training.svi import NonFiniteLossError, check_checkpoint, fit, trained_seconds


def _resolve_config(args: argparse.Namespace) -> RunConfig:
    config = configs.load(args.config) if args.config else RunConfig()
    if args.seed is not None:
        config.seed = args.seed
    if args.epochs is not None:
        config.svi.epochs = args.epochs
    if args.max_minutes is not None:
        config.svi.max_minutes = args.max_minutes
    if args.particles is not None:
        config.eval.num_particles = args.particles
    config.imports = list(dict.fromkeys([*config.imports, *args.imports]))  # recorded in the run's config.toml
    import_pairs(config.imports)  # before "all variants" is resolved: the user's pairs are part of it
    if args.variants is not None:
        config.variants = variant_names(args.variants)
    if not config.variants:
        config.variants = list(VARIANTS)
    return config


# What a resumed run takes from its config.toml and may not change halfway (the results would mix two settings).
# --max-minutes may change: the clock only chooses where training stops, so raising it continues the variants that
# stopped by time from their checkpoints, as if the run had been given the larger budget from the start.
FIXED_BY_RESUME = {"config": "CONFIG", "out": "--out", "seed": "--seed", "epochs": "--epochs",
                   "particles": "--particles", "variants": "--variants"}


def _resume_config(args: argparse.Namespace) -> RunConfig:
    """The config of the run directory ``args.resume``; refuses arguments that would change it."""
    given = [flag for key, flag in FIXED_BY_RESUME.items() if getattr(args, key) is not None]
    if given:
        raise UsageError(f"--resume continues a run with the settings in its config.toml, so it cannot be combined "
                         f"with {', '.join(given)}; drop them (only --max-minutes, --threads, --no-diagnose and "
                         "--quiet apply), or start a new run for other settings")
    run_dir = Path(args.resume)
    if not run_dir.is_dir():
        raise UsageError(f"--resume {run_dir}: no such directory; pass a run directory that `vae-priors run` created")
    if not (run_dir / "config.toml").is_file():
        raise UsageError(f"--resume {run_dir}: it has no config.toml, so it is not a run directory that "
                         "`vae-priors run` created (or it failed before writing one: start a new run)")
    config = configs.load(run_dir / "config.toml")
    if args.max_minutes is not None:
        config.svi.max_minutes = args.max_minutes
    return config


def _check(config: RunConfig, args: argparse.Namespace) -> RunConfig:
    """Every check that needs no data: settings, device, variant names."""
    if args.threads is not None:
        config.threads = args.threads
    configs.check(config)
    if config.svi.device == "cuda" and not torch.cuda.is_available():
        raise UsageError('svi.device = "cuda" but torch sees no CUDA device; use device = "cpu"')
    import_pairs(config.imports)  # a resumed run's own imports (a new run's are already in)
    for name in config.variants:
        try:
            get_variant(name)
        except KeyError as err:
            raise UsageError(err.args[0]) from None
    return config


def _new_run_dir(args: argparse.Namespace, config: RunConfig, threads: int) -> Path:
    """Create the run directory with its config.toml and provenance.toml, or nothing at all."""
    if args.out:
        out = Path(args.out)
    else:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        out = Path("runs") / f"{config.data.name}-seed{config.seed}-{stamp}"
    if out.exists():
        raise UsageError(f"run directory {out} already exists; pass a new --out DIR (runs are never overwritten), "
                         f"or finish it with `vae-priors run --resume {shlex.quote(str(out))}`")
    out.mkdir(parents=True)
    try:
        write_text(out / "config.toml", configs.dumps(config))
        write_text(out / "provenance.toml", tomli_w.dumps(provenance(threads)))
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # a directory without config.toml could not be resumed
        raise
    return out


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path, float_precision="round_trip")  # the numbers written back are the same bits
    except (ValueError, UnicodeDecodeError) as err:  # pandas' EmptyDataError and ParserError are ValueErrors
        raise FileFormatError(f"cannot read {path} ({type(err).__name__}: {str(err).splitlines()[0]}); it was "
                              "damaged -- delete it to redo every variant of the run") from None


def _finished(run_dir: Path, config: RunConfig) -> tuple[dict[str, dict], dict[str, pd.DataFrame]]:
    """The metrics row and history of every variant a run already finished (it is in metrics.csv)."""
    if not (run_dir / "metrics.csv").is_file():
        return {}, {}
    metrics = _read_csv(run_dir / "metrics.csv")
    history = _read_csv(run_dir / "history.csv") if (run_dir / "history.csv").is_file() else pd.DataFrame()
    rows = {row["variant"]: row for row in metrics.to_dict("records") if row["variant"] in config.variants}
    missing = [name for name in rows if history.empty or name not in set(history.variant)]
    if missing:
        raise FileFormatError(f"{run_dir / 'history.csv'} lacks the variants {missing} that metrics.csv lists; delete "
                              "metrics.csv to redo every variant")
    histories = {name: history[history.variant == name].reset_index(drop=True) for name in rows}
    for name in [name for name, row in rows.items() if row.get("stopped_by") == "time"]:
        trained = histories[name].seconds.sum() / 60.0
        if trained >= config.svi.max_minutes:
            continue
        if not _checkpoint(run_dir, name).is_file():
            raise UsageError(f"{name} stopped by its time budget, and the budget is now {config.svi.max_minutes:g} "
                             f"min, but {_checkpoint(run_dir, name)} is gone, so its training cannot continue; keep "
                             f"the budget its run had, or start a new run")
        # Its time budget was raised: it goes on from its checkpoint, and its results are replaced when it ends.
        if distributed.is_main():
            print(f"{name}: stopped by time (evaluated at epoch {len(histories[name])}, after {trained:.1f} min of "
                  f"training); the budget is now {config.svi.max_minutes:g} min, so it continues from its last "
                  "checkpoint (its rows in metrics.csv and history.csv, pointwise/ and pairs/ are replaced when it "
                  "ends)", file=sys.stderr)
        del rows[name], histories[name]
    return rows, histories


def _record_budget(run_dir: Path, max_minutes: float) -> None:
    """Write a budget that ``--resume --max-minutes`` changed into the run's config.toml (a later resume keeps it)."""
    saved = configs.load(run_dir / "config.toml")
    if saved.svi.max_minutes != max_minutes:
        print(f"svi.max_minutes: {saved.svi.max_minutes:g} -> {max_minutes:g} in {run_dir / 'config.toml'}",
              file=sys.stderr)
        saved.svi.max_minutes = max_minutes
        write_text(run_dir / "config.toml", configs.dumps(saved))


def _checkpoint(run_dir: Path, name: str) -> Path:
    return run_dir / "checkpoints" / f"{name}.pt"


def _format_table(metrics: pd.DataFrame) -> str:
    def pm(mean: float, se: float) -> str:
        return "nan" if math.isnan(mean) else f"{mean:8.2f} ± {se:.2f}"

    rows = [{"variant": r.variant, "target": "log p(y|x)" if r.conditional else "log p(x)",
             "epochs": r.epochs, "best": r.best_epoch, "test ELBO": pm(r.test_elbo, r.test_elbo_se),
             "test log-lik (IS)": pm(r.test_log_lik, r.test_log_lik_se), "fit s": f"{r.fit_seconds:.1f}"}
            for r in metrics.itertuples()]
    return pd.DataFrame(rows).to_string(index=False)


def _shared_run_dir(args: argparse.Namespace, config: RunConfig, threads: int) -> Path:
    """A new run directory, created by rank 0 alone; every rank gets its path (or the news that it failed)."""
    made = None
    try:
        if distributed.is_main():
            made = str(_new_run_dir(args, config, threads))
    finally:  # rank 0 tells the others even when it failed, so they stop instead of waiting
        made = distributed.from_main(made)
    if made is None:
        raise UsageError("rank 0 could not create the run directory (its message says why)")
    return Path(made)


def command_run(args: argparse.Namespace) -> int:
    resume = Path(args.resume) if args.resume else None
    config = _check(_resume_config(args) if resume else _resolve_config(args), args)
    threads = set_threads(config.threads)
    distributed.init_from_environment(config.svi.device)  # under torchrun; a no-op for one process
    try:
        return _command_run(args, config, resume, threads)
    finally:
        distributed.shutdown()


def _command_run(args: argparse.Namespace, config: RunConfig, resume: Path | None, threads: int) -> int:
    # Everything that can fail on bad input runs before the run directory exists: data, every pair, checkpoints.
    data = load_run_data(config.data)
    pairs = {name: build_pair(config, data, name) for name in config.variants}
    done, done_history = _finished(resume, config) if resume else ({}, {})
    for name, (pair, _) in pairs.items():
        if resume and name not in done and _checkpoint(resume, name).is_file():
            check_checkpoint(pair, config.svi, _checkpoint(resume, name))
    if resume and args.max_minutes is not None and distributed.is_main():
        _record_budget(resume, config.svi.max_minutes)
    run_dir = resume or _shared_run_dir(args, config, threads)
    try:
        if not distributed.is_main():
            return _train_only(args, config, run_dir, pairs, done, resume is not None)
        return _train_evaluate_diagnose(args, config, run_dir, pairs, done, done_history, resume is not None)
    except NonFiniteLossError:
        raise  # resuming would meet the same NaN: the message says which setting to change
    except (Exception, KeyboardInterrupt) as err:
        err.run_dir = run_dir  # the boundary in cli/__init__ prints how to finish the run
        raise


def _train_only(args: argparse.Namespace, config: RunConfig, run_dir: Path, pairs: dict[str, tuple[Pair, Dataset]],
                done: dict[str, dict], resume: bool) -> int:
    """A rank > 0: its part in training, evaluating and diagnosing each variant; rank 0 alone writes."""
    for name in config.variants:
        if name not in done:
            pair, dataset = pairs[name]
            checkpoint = _checkpoint(run_dir, name)
            fit(pair, dataset, config.svi, seed=config.seed, checkpoint=checkpoint,
                resume=resume and checkpoint.is_file(), name=name, progress=False)
            evaluate(pair, dataset.test.to(config.svi.device), config.eval.num_particles,
                     config.eval.local_refit_steps, seed=config.seed)  # its share of the test points
    if config.diagnose and not args.no_diagnose:
        from vae_priors.experiments.runs.diagnose import diagnose_run

        diagnose_run(run_dir, overwrite=resume)  # its shares; waits for rank 0 to have written the pairs
    distributed.barrier()  # released when rank 0 has written everything
    return 0


def _train_variant(args: argparse.Namespace, config: RunConfig, run_dir: Path, name: str, pair: Pair,
                   dataset: Dataset, resume: bool) -> tuple[dict, pd.DataFrame]:
    """Train (or continue from its checkpoint) and evaluate one variant; its metrics row and history."""
    start = time.perf_counter()
    checkpoint = _checkpoint(run_dir, name)
    earlier = trained_seconds(checkpoint) if resume and checkpoint.is_file() else 0.0  # earlier sessions' epochs
    result = fit(pair, dataset, config.svi, seed=config.seed, checkpoint=checkpoint, resume=resume and
                 checkpoint.is_file(), name=name, progress=None if not args.quiet else False)
    fit_seconds = time.perf_counter() - start + earlier
    save_pair(pair, run_dir / "pairs" / f"{name}.pt")
    evaluation = evaluate(pair, dataset.test.to(config.svi.device),
                          config.eval.num_particles, config.eval.local_refit_steps, seed=config.seed)
    write_pointwise(evaluation, pointwise_path(run_dir, name))
    if evaluation.guide is not pair.guide:  # a per-point guide fitted on the test points: diagnose reuses it
        save_torch(evaluation.guide.state_dict(), test_guide_path(run_dir, name))
    row = {"variant": name, "conditional": get_variant(name).conditional, "data": dataset.name,
           "epochs": len(result.history), "best_epoch": result.best_epoch, "monitor": result.monitor,
           "stopped_by": result.stopped_by,
           "best_elbo": result.best_elbo, **evaluation.summary(),
           "num_particles": config.eval.num_particles, "fit_seconds": fit_seconds,
           "eval_seconds": time.perf_counter() - start - fit_seconds + earlier, "note": evaluation.note}
    history = result.history.assign(variant=name)
    return row, history[["variant", *result.history.columns]]


def _train_evaluate_diagnose(args: argparse.Namespace, config: RunConfig, run_dir: Path,
                             pairs: dict[str, tuple[Pair, Dataset]], done: dict[str, dict],
                             done_history: dict[str, pd.DataFrame], resume: bool) -> int:
    if resume:
        print(f"resuming {run_dir}: {len(done)} of {len(config.variants)} variants finished")
    else:
        print(f"run directory: {run_dir}")
    histories, metrics = [], []
    for name in config.variants:
        if name in done:
            metrics.append(done[name]), histories.append(done_history[name])
            continue
        row, history = _train_variant(args, config, run_dir, name, *pairs[name], resume)
        metrics.append(row), histories.append(history)
        # Written after every variant: a failure later keeps what is finished, and --resume skips it.
        write_csv(run_dir / "history.csv", pd.concat(histories, ignore_index=True))
        write_csv(run_dir / "metrics.csv", pd.DataFrame(metrics))
        if args.quiet is False:
            print(f"  {name}: {row['epochs']} epochs, test log-lik {row['test_log_lik']:.2f} "
                  f"({row['fit_seconds']:.1f} s)", file=sys.stderr)
    write_csv(run_dir / "history.csv", pd.concat(histories, ignore_index=True))
    write_csv(run_dir / "metrics.csv", pd.DataFrame(metrics))
    table = pd.DataFrame(metrics)
    print(f"\nHeld-out results on {config.data.name} (per data point; IS = importance sampling with "
          f"{config.eval.num_particles} draws; conditional variants predict the hidden quadrants):")
    print(_format_table(table))
    notes = [f"  {r.variant}: {r.note}" for r in table.itertuples() if isinstance(r.note, str) and r.note]
    if notes:
        print("notes:\n" + "\n".join(notes))
    found = write_findings(run_dir, read_pointwise(run_dir, config.variants))
    if len(found):
        print(f"\nFindings (paired differences over the same {found.n_points.iloc[0]} test points; "
              f"{run_dir / 'findings.csv'}):")
        for row in found.itertuples():
            print(f"  {row.question}\n    {row.finding}")
    if config.diagnose and not args.no_diagnose:
        from vae_priors.experiments.cli.diagnose import format_diagnostics
        from vae_priors.experiments.runs.diagnose import diagnose_run

        # A resumed run may hold diagnostics from an attempt that stopped while writing them: replace them.
        diagnostics = diagnose_run(run_dir, progress=not args.quiet and sys.stderr.isatty(), overwrite=resume)
        print(f"\nDiagnostics ({run_dir / 'diagnostics.csv'}, report: {run_dir / 'report.html'}):")
        print(format_diagnostics(diagnostics))
    print(f"\nwrote {run_dir}")
    distributed.barrier()  # the other ranks wait here for the run to be complete
    return 0
