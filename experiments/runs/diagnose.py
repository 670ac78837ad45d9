"""``diagnose_run(RUN_DIR)``: every diagnostic of every trained variant of a run, written next to the run.

    RUN_DIR/diagnostics.csv           one row per variant (columns explained in experiments.report.COLUMN_HELP)
    RUN_DIR/diagnostics/NAME.nc       InferenceData per variant (draws for a subset of test points, q_agg vs p(z))
    RUN_DIR/diagnostics/*.png         plots per variant and the comparison plots
    RUN_DIR/diagnostics/compare-*.csv the az.compare table (ranks, elpd differences and their paired SE ``dse``)
    RUN_DIR/findings.csv              the paired findings, recomputed from RUN_DIR/pointwise (as ``run`` writes them)
    RUN_DIR/report.html               all of it on one self-contained page, findings first

Per-point numbers (log p(x), PSIS k-hat, ELBO, KL) are on the test split; the aggregated posterior is over the
training encodings (q_agg is the code the decoder was trained on). Outputs are built in a hidden temporary
directory and moved into place at the end, so a failure leaves the previous outputs (or none) untouched, and
existing outputs are only replaced with ``overwrite=True``.

Under torchrun (``torchrun --nproc_per_node=W vae-priors diagnose RUN_DIR``, or the end of a ``run``) every rank
runs ``diagnose_run``: the per-point work (log weights, PSIS k-hat, KLs, the latent-source scores, the amortization
gap) is split over ranks by test or training points, the q_agg densities by Monte Carlo draws, and rank 0 alone
writes the outputs (``training.distributed``). Ranks > 0 draw their own Monte Carlo noise, so the numbers are
reproducible for a given W; those with a closed form or shared draws equal one process's.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from vae_priors.experiments.config import RunConfig
from vae_priors.experiments.diagnostics import arviz_adapter
from vae_priors.experiments.diagnostics.aggregate import (
    aggregate_diagnostics,
    posterior_components,
    prior_components,
    sample_q_agg,
)
from vae_priors.experiments.diagnostics.amortization import NotDiagonalGaussianGuide, amortization_gap
from vae_priors.experiments.diagnostics.generation import PriorSampler
from vae_priors.experiments.diagnostics.point import inference_arrays, point_diagnostics
from vae_priors.experiments.diagnostics.sample_quality import load_or_train_classifier, score_samples
from vae_priors.experiments.evaluation.comparisons import standard_error
from vae_priors.experiments.evaluation.importance import evaluation_guide
from vae_priors.experiments.files import UMASK, write_csv, write_text
from vae_priors.experiments.registry import Pair, get_variant
from vae_priors.experiments.reporting import plots, report
from vae_priors.experiments.runs import samples
from vae_priors.experiments.runs.layout import (
    RunData,
    load_pair,
    load_run,
    load_test_guide,
    read_pointwise,
    write_findings,
)
from vae_priors.experiments.training import distributed

OUTPUTS = ("diagnostics.csv", "diagnostics", "report.html")
AGG_DRAWS = 10_000  # Monte Carlo draws from q_agg and from p(z) for the aggregate KLs
PLOT_DRAWS = 2000  # q_agg and p(z) draws shown in the plots and stored in the NetCDF file
NC_POINTS = 16  # test points whose S draws go into the NetCDF file (all S draws of all points would be S x N x D)
GAP_POINTS = 1000  # test points for the amortization gap (each gets its own refitted Gaussian)
# Monte Carlo KLs (no closed form) evaluate at most this many component densities per split: the VampPrior's
# K = 500 on MNIST stays at 256 draws per point; a mixture over N = 50 000 training encodings gets 8 to 40.
KL_MAX_EVALUATIONS = 2 * 10**10

# The report's tables, grouped by question (diagnostics.csv has these and more: SEs, direct estimates, settings).
COLUMNS = [
    report.TableGroup("Fit and inference", ["log_lik", "elbo", "khat_above", "amortization_gap"]),
    report.TableGroup("Rate and information (ELBO surgery)", ["mean_kl", "mutual_info", "log_n", "kl_qagg_p",
                                                               "active_units"]),
    report.TableGroup("p(z) against q_agg, and generating from each",
                      ["kl_p_qagg", "prior_hole_share", "gen_log_lik_prior", "gen_log_lik_q_agg", "gen_log_lik_gmm",
                       "fd_prior", "fd_q_agg", "fd_gmm", "coverage_prior"]),
    report.TableGroup("Fit and inference", ["log_lik", "elbo", "khat_above"], conditional=True),
    report.TableGroup("Rate, information and the x-conditioned prior",
                      ["mean_kl", "mutual_info", "surgery_residual", "kl_prior_standard", "kl_prior_guide",
                       "conditional_hole_share"], conditional=True),
    report.TableGroup("Marginal checks", ["kl_qagg_p", "kl_p_qagg", "active_units"], conditional=True),
]


def check_outputs(run_dir: Path, overwrite: bool) -> list[Path]:
    """The diagnostics outputs already in ``run_dir``; an error if there are any and ``overwrite`` is False."""
    existing = [run_dir / name for name in OUTPUTS if (run_dir / name).exists()]
    if existing and not overwrite:
        names = ", ".join(p.name for p in existing)
        raise FileExistsError(f"{run_dir} already has diagnostics ({names}); nothing was changed. Pass "
                              "overwrite=True (`vae-priors diagnose RUN_DIR --overwrite`) to replace them, or copy "
                              "them elsewhere first")
    return existing


def _variants(run_dir: Path, config: RunConfig, requested: list[str] | None) -> list[str]:
    if requested:
        return list(requested)  # load_pair names a missing one
    trained = [p.stem for p in sorted((run_dir / "pairs").glob("*.pt"))]
    order = config.variants or trained
    names = [v for v in order if v in trained]
    if not names:
        raise FileNotFoundError(f"{run_dir / 'pairs'} holds no trained pair; run `vae-priors run` first")
    return names


def diagnose_variant(run_dir: Path, name: str, config: RunConfig, data: RunData, num_particles: int, work: Path,
                     classifier, found: list[pd.DataFrame]) -> tuple[dict, report.VariantSection, object, Pair]:
    """One variant: its CSV row, its report section, its ``ELPDData`` and the loaded pair; its generation
    findings are appended to ``found``."""
    seed = config.seed
    pair, dataset = load_pair(run_dir, name, config, data)
    for parameter in [*pair.model.parameters(), *pair.guide.parameters()]:
        parameter.requires_grad_(False)  # diagnostics read the trained pair; only refitted local guides train
    spec = get_variant(name)
    # The guide for the test points: the pair's own, or a per-point guide refitted on them (decoder frozen).
    saved = load_test_guide(run_dir, name, pair, len(dataset.test))  # fitted by `run`; refitted only if missing
    guide, note = evaluation_guide(pair, dataset.test, saved, config.eval.local_refit_steps, seed)
    points = point_diagnostics(pair, dataset.test, num_particles=num_particles, seed=seed, guide=guide,
                               kl_max_evaluations=KL_MAX_EVALUATIONS)
    agg = aggregate_diagnostics(pair, dataset.train, num_samples=AGG_DRAWS, seed=seed,
                                kl_max_evaluations=KL_MAX_EVALUATIONS)
    threshold = arviz_adapter.khat_threshold(num_particles)
    row = {"variant": name, "conditional": spec.conditional, "target": "log p(y|x)" if spec.conditional else "log p(x)",
           "log_lik": points.log_lik_psis.mean(), "log_lik_se": standard_error(points.log_lik_psis),
           "log_lik_is": points.log_lik_is.mean(), "elbo": points.elbo.mean(), "elbo_se": standard_error(points.elbo),
           **{k: v for k, v in agg.summary().items() if k not in ("num_points", "num_samples")},
           "latent_dim": len(agg.unit_activity), "khat_above": float((points.khat > threshold).mean()),
           "khat_threshold": threshold, "num_particles": num_particles, "kl_draws_test": points.kl_draws,
           "note": note,
           "kl_prior_standard": math.nan if points.kl_prior_standard is None else points.kl_prior_standard.mean(),
           "kl_prior_guide": math.nan if points.kl_prior_guide is None else points.kl_prior_guide.mean(),
           "conditional_hole_share": math.nan if points.conditional_hole_share is None
           else points.conditional_hole_share.mean()}
    guide_is_prior = spec.conditional and points.kl_analytic and float(abs(points.kl).max()) < 1e-9
    row["guide_is_prior"] = guide_is_prior
    args = dataset.train.tensors()
    q_train = posterior_components(pair.guide, args)
    z_q = sample_q_agg(q_train, PLOT_DRAWS, seed)
    if spec.conditional:  # the prior depends on x: show the aggregated prior 1/N sum_n p(z|x_n)
        z_p = sample_q_agg(prior_components(pair.model, pair.guide, args), PLOT_DRAWS, seed + 1)
    else:  # the model's own "z" site, cheap even for a leave-one-out mixture prior
        z_p = PriorSampler(pair.model, dataset.x_dim).sample(PLOT_DRAWS, seed + 1)
    prior_label = "p_agg(z) = 1/N sum_n p(z|x_n)" if spec.conditional else "p(z)"
    elpd = arviz_adapter.elpd_data(points.log_lik_psis, points.khat, num_particles)
    figures = [
        report.Plot("Marginals", plots.marginals(z_q, z_p, work / f"{name}-marginals.png"),
                    f"each latent dimension: q_agg(z) over the {len(dataset.train)} training encodings vs "
                    f"{prior_label}"),
        report.Plot("2-D view", plots.latent_2d(z_q, z_p, work / f"{name}-latent2d.png"),
                    f"{PLOT_DRAWS} draws each from q_agg and {prior_label}"),
        report.Plot("Pareto k-hat", plots.khat(lambda ax: arviz_adapter.plot_khat(elpd, ax), work / f"{name}-khat.png",
                                               row["khat_above"], threshold),
                    f"per test point, {num_particles} importance draws from q; above the line the estimate is "
                    "unreliable"),
    ]
    if agg.kl_per_dim is not None:
        figures.append(report.Plot("KL per dimension", plots.kl_per_dim(
            agg.kl_per_dim, work / f"{name}-kl-per-dim.png", agg.unit_activity > 0.01),
            "mean over training points of KL(q(z_d|x) || p(z_d))"))
    if not spec.conditional:
        figures += samples.generation(pair, points.guide, dataset, work, name, classifier, seed, row, q_train,
                               num_particles, found)
    figures += samples.reconstructions(pair, points.guide, dataset, data, config, work, name, seed)
    subset = torch.arange(min(NC_POINTS, len(dataset.test)))
    arrays = inference_arrays(pair, dataset.test, subset, num_particles, points.guide, seed)
    held_out = {"log_lik_psis": points.log_lik_psis, "khat": points.khat, "log_lik_is": points.log_lik_is,
                "elbo": points.elbo}
    constant = dataset.test.x[subset].cpu().numpy() if spec.conditional else None
    attrs = {"variant": name, "data": dataset.name, "target": row["target"], "num_particles": str(num_particles),
             "run": run_dir.name}
    idata = arviz_adapter.to_inference_data(**arrays, q_agg_draws=z_q.numpy(), prior_agg_draws=z_p.numpy(),
                                            held_out=held_out, constant=constant, attrs=attrs)
    arviz_adapter.write_netcdf(idata, work / f"{name}.nc")
    notes = [note] if note else []
    if guide_is_prior:
        notes.append("its guide is its prior: q(z|x,y) = p(z|x) exactly (KL 0 at every test point), so the rate is 0 "
                     "by construction, I(index; z) is what p(z|x) carries about the point, and no dimension is "
                     "'collapsed' in the usual sense")
    elif agg.collapsed_dims:
        notes.append(f"collapsed dimensions (mean KL < 0.01 nats): {agg.collapsed_dims}")
    section = report.VariantSection(name, spec.description, figures, notes)
    return row, section, elpd, pair


def _intro(run_dir: Path, config: RunConfig, data: RunData, num_particles: int, classifier, note: str) -> list[str]:
    test = data.plain.test
    lines = [f"Run {run_dir.name}: data {data.plain.name} ({len(data.plain.train)} training / {len(test)} test points, "
             f"binarization {config.data.binarize}, {config.data.likelihood} likelihood), latent_dim "
             f"{config.model.latent_dim}, seed {config.seed}. Per-point numbers are means over the test split with "
             f"{num_particles} importance draws per point; the aggregated posterior q_agg is over the training "
             f"encodings ({AGG_DRAWS} Monte Carlo draws for its KLs).",
             "Conditional variants (target log p(y|x)) model the hidden quadrants given the visible one(s): their "
             "likelihoods are not comparable with log p(x), their aggregate 'p' is p_agg(z) = 1/N sum_n p(z|x_n), "
             "and instead of unconditional samples they show predictions next to the truth."]
    if classifier is None:
        return [*lines, f"Sample scores: none ({note})."]
    drawn = samples.NUM_GENERATED
    reference = score_samples(classifier, data.plain.train.x[:drawn], test.x)
    return [*lines, f"Sample scores use {drawn} draws x ~ p(x|z) per source and a classifier trained on the "
            f"training split ({note}). Reference: {min(drawn, len(data.plain.train))} training images score "
            f"FD {reference.frechet:.3g}, max prob {reference.max_prob:.3g}, coverage {reference.coverage:.3g} "
            "against the test split."]


def _publish(work: Path, target: Path) -> None:
    """Move the finished ``work`` directory to ``target``, replacing an old one with two renames."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{work.name}")
        target.rename(old)
    work.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def diagnose_run(run_dir: str | Path, num_particles: int | None = None, variants: list[str] | None = None,
                 progress: bool = False, overwrite: bool = False, cache_dir: str | Path | None = None,
                 imports: list[str] | None = None) -> pd.DataFrame:
    """Diagnose the trained variants of ``run_dir`` (default: all) and write the outputs listed in the module doc.

    :param num_particles: importance draws per test point (default: the run's ``eval.num_particles``).
    :param imports: modules that register pairs, besides those the run recorded (its config's ``imports``).
    :param cache_dir: where the sample-scoring classifier is cached (default: ``RUN_DIR/../.vae-priors-cache``,
        shared by the runs beside this one).
    :raises FileExistsError: if diagnostics outputs exist and ``overwrite`` is False (nothing is changed).
    """
    run_dir = Path(run_dir)
    main = distributed.is_main()
    problem = None
    if main:  # rank 0 decides, and tells the other ranks before they start work they would wait in
        try:
            check_outputs(run_dir, overwrite)
        except FileExistsError as err:
            problem = str(err)
    problem = distributed.from_main(problem)
    if problem:
        raise FileExistsError(problem)
    config, data = load_run(run_dir, imports or [])
    names = _variants(run_dir, config, variants)
    num_particles = num_particles or config.eval.num_particles
    cache = Path(cache_dir) if cache_dir else run_dir.parent / ".vae-priors-cache"
    # Ranks > 0 compute their shares of every diagnostic and build their own throw-away page elsewhere: one code
    # path, so every rank reaches the same collectives in the same order; only rank 0's work is published.
    work = Path(tempfile.mkdtemp(dir=run_dir if main else None, prefix=".diagnostics-"))
    work.chmod(0o777 & ~UMASK)  # mkdtemp creates 0700; the outputs are for people to read
    try:
        classifier, classifier_note = (load_or_train_classifier(data.plain.train, cache, data.plain.name, config.seed)
                                       if main else (None, "computed by rank 0"))
        rows, sections, elpds, pairs, generation = [], [], {}, {}, []
        bar = tqdm(names, desc="diagnostics", disable=not (progress and main))
        for name in bar:
            bar.set_postfix_str(name)
            with plots.labelled(f"{name} on {data.plain.name} ({run_dir.name})"):
                row, section, elpd, pairs[name] = diagnose_variant(run_dir, name, config, data, num_particles, work,
                                                                   classifier, generation)
            rows.append(row), sections.append(section)
            elpds.setdefault(row["target"], {})[name] = elpd
        table = pd.DataFrame(rows)
        for name, pair in pairs.items():  # every amortized unconditional pair: encoder vs per-point Gaussians
            if pair.conditional or not getattr(pair.guide, "amortized", True):
                continue
            try:
                gap, gap_se = amortization_gap(pair, data.plain.test.subset(slice(0, GAP_POINTS)),
                                               config.eval.local_refit_steps, num_particles, config.seed)
            except NotDiagonalGaussianGuide:  # no per-point Gaussian of the guide's family to compare with
                continue
            table.loc[table.variant == name, ["amortization_gap", "amortization_gap_se"]] = gap, gap_se
        comparisons = []
        if (run_dir / "history.csv").is_file():
            history = pd.read_csv(run_dir / "history.csv")
            history = history[history.variant.isin(names)]
            with plots.labelled(f"{data.plain.name} ({run_dir.name})"):
                comparisons.append(report.Plot("Learning curves", plots.learning_curves(
                    history, work / "learning-curves.png"), "train and validation ELBO per point and epoch "
                    "(history.csv); the best validation epoch is the one kept"))
        for target, group in elpds.items():
            if len(group) >= 2:
                comparison = arviz_adapter.compare(group)
                slug = "p-y-given-x" if "y" in target else "p-x"
                write_csv(work / f"compare-{slug}.csv", comparison.rename_axis("variant").reset_index())
                comparisons.append(report.Plot(f"Held-out {target}", plots.compare(
                    lambda ax, c=comparison: arviz_adapter.plot_compare(c, ax), work / f"compare-{slug}.png",
                    len(group), f"Held-out {target}, PSIS-smoothed IS (higher is better)",
                    f"sum over the {len(data.plain.test)} test points of {target}"),
                    "az.compare on the sum over test points of the PSIS-smoothed importance-sampled estimate "
                    f"(not leave-one-out cross-validation); {num_particles} draws per point"))
        if main:
            intro = _intro(run_dir, config, data, num_particles, classifier, classifier_note)
            found = write_findings(run_dir, read_pointwise(run_dir, names), *generation)
            page = report.render(f"Diagnostics: {run_dir.name}", intro, table, COLUMNS, sections, comparisons,
                                 found)
            _publish(work, run_dir / "diagnostics")
            write_csv(run_dir / "diagnostics.csv", table)
            write_text(run_dir / "report.html", page)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return table
