"""Decoded samples and reconstructions of one diagnosed variant: the generation findings (held-out log p_s(x) of
the decoder under each latent source), the sample scores and the image grids of the report."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from vae_priors.experiments.config import RunConfig
from vae_priors.experiments.data.datasets import Dataset, quadrant_masks
from vae_priors.experiments.diagnostics.aggregate import log_q_agg
from vae_priors.experiments.diagnostics.generation import generate, latent_samplers, predict, reconstruct
from vae_priors.experiments.diagnostics.latent_sources import source_log_likelihoods
from vae_priors.experiments.diagnostics.sample_quality import score_samples
from vae_priors.experiments.evaluation.comparisons import Question, findings, standard_error
from vae_priors.experiments.registry import Pair
from vae_priors.experiments.reporting import plots, report
from vae_priors.experiments.runs.layout import RunData

NUM_GENERATED = 1000  # decoded samples per source for the sample scores
GEN_POINTS = 1000  # test points scored under each latent source (q_agg costs S x points x N_train)
GEN_DRAWS = 100  # importance draws per point for those scores
GRID = 12  # images per row in the sample and reconstruction grids


def image_rows(dataset: Dataset, data: RunData, config: RunConfig, rows: dict[str, torch.Tensor],
               x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Flattened full images: for a conditional pair each y is put back next to its visible quadrants x."""
    if not dataset.conditional:
        return rows
    mask = quadrant_masks(data.plain.image_shape, config.data.quadrants)
    out = {}
    for label, y in rows.items():
        full = torch.zeros(y.shape[0], mask.numel())
        full[:, mask], full[:, ~mask] = x[: y.shape[0]], y
        out[label] = full
    return out


def generation_findings(pair: Pair, guide, name: str, test_x: torch.Tensor, q_train, gmm, num_particles: int,
                        seed: int, row: dict) -> pd.DataFrame:
    """Generate from p(z), q_agg or a GMM? Paired held-out log p_s(x) of each source (``latent_sources``)."""
    x = test_x[:GEN_POINTS]
    scores = source_log_likelihoods(pair.model, guide, x, {"q_agg": lambda z: log_q_agg(z, q_train),
                                                           "gmm": gmm.mixture.log_prob},
                                    min(num_particles, GEN_DRAWS), seed)
    for source, values in scores.items():
        row |= {f"gen_log_lik_{source}": values.mean().item(),
                f"gen_log_lik_{source}_se": standard_error(values.numpy())}
    label = {"prior": f"{name} with z ~ p(z)", "q_agg": f"{name} with z ~ q_agg", "gmm": f"{name} with z ~ GMM"}
    questions = (Question(f"Generate from p(z) or from q_agg? ({name})", label["q_agg"], label["prior"]),
                 Question(f"Generate from p(z) or from a GMM on the encodings? ({name})", label["gmm"],
                          label["prior"]))
    return findings({label[k]: v.numpy() for k, v in scores.items()}, questions,
                    measure=f"held-out log p_s(x) of the decoder under latent source s ({len(x)} test points)")


def generation(pair: Pair, guide, dataset: Dataset, work: Path, name: str, classifier, seed: int, row: dict,
               q_train, num_particles: int, found: list[pd.DataFrame]) -> list[report.Plot]:
    samplers = latent_samplers(pair.model, q_train, dataset.x_dim, seed)
    found.append(generation_findings(pair, guide, name, dataset.test.x, q_train, samplers["gmm"], num_particles,
                                     seed, row))
    decoded = generate(pair.model, samplers, dataset.x_dim, NUM_GENERATED, seed)
    if classifier is not None:
        for source, out in decoded.items():
            scores = score_samples(classifier, out.draw, dataset.test.x)
            row |= {f"fd_{source}": scores.frechet, f"fd_{source}_se": scores.frechet_se,
                    f"max_prob_{source}": scores.max_prob, f"max_prob_{source}_se": scores.max_prob_se,
                    f"coverage_{source}": scores.coverage}
    if dataset.image_shape is None:
        return []
    rows = {f"{s}": d.mean for s, d in decoded.items()}
    caption = "; ".join(f"{s}: {sampler.description}" for s, sampler in samplers.items())
    return [report.Plot("Samples from each source (decoder means)", plots.image_rows(
        rows, dataset.image_shape, work / f"{name}-samples.png", GRID), caption)]


def reconstructions(pair: Pair, guide, dataset: Dataset, data: RunData, config: RunConfig, work: Path, name: str,
                    seed: int) -> list[report.Plot]:
    shape = data.plain.image_shape
    if shape is None:
        return []
    args = tuple(t[:GRID] for t in dataset.test.tensors())
    rows = {"data": dataset.test.y[:GRID] if dataset.conditional else args[0],
            "reconstruction": reconstruct(pair.model, guide, args)}
    caption = "decoder mean at the mean of q(z|.)"
    if dataset.conditional:
        predictions = predict(pair.model, args[0], 3, seed)
        rows |= {f"prediction {k + 1}": y for k, y in enumerate(predictions)}
        caption = ("top: test images; reconstruction: z = mean of q(z|x,y), which sees the hidden quadrants; "
                   "predictions: three draws z ~ p(z|x) from the visible quadrant(s) only (decoder means)")
    rows = image_rows(dataset, data, config, rows, args[0])
    return [report.Plot("Reconstructions" + (" and predictions" if dataset.conditional else ""),
                        plots.image_rows(rows, shape, work / f"{name}-reconstructions.png", GRID), caption)]
