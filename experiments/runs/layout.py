"""A run directory: what ``vae-priors run`` writes and what ``vae-priors diagnose`` reads back.

    RUN_DIR/config.toml            the resolved config (every default filled in)
    RUN_DIR/history.csv            one row per variant and epoch
    RUN_DIR/metrics.csv            one row per variant: fit summary and held-out log-likelihood
    RUN_DIR/checkpoints/NAME.pt    resumable training state (last epoch)
    RUN_DIR/pairs/NAME.pt          the trained pair (best epoch): {"model": state_dict, "guide": state_dict}
    RUN_DIR/pairs/test-guides/NAME.pt   a non-amortized pair's guide fitted on the test points (decoder frozen)
    RUN_DIR/pointwise/NAME.csv     one row per test point: importance-sampled log-likelihood, ELBO, PSIS estimate, k-hat
    RUN_DIR/findings.csv           paired differences between variants over the same test points, worded by evidence
    RUN_DIR/provenance.toml        code and library versions, machine, torch threads
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd
import pyro
import torch
from torch import nn

from vae_priors.experiments import config as configs
from vae_priors.experiments.config import DataConfig, RunConfig
from vae_priors.experiments.data.datasets import Dataset, binarize, load_digits, quadrant_task, validate
from vae_priors.experiments.diagnostics import arviz_adapter
from vae_priors.experiments.evaluation.comparisons import findings
from vae_priors.experiments.evaluation.importance import Evaluation
from vae_priors.experiments.files import FileFormatError, load_state, load_torch, save_torch, write_csv
from vae_priors.experiments.registry import Pair, get_variant, import_pairs


@dataclass
class RunData:
    """The data of a run: the unconditional set and its quadrant-completion version for conditional pairs."""

    plain: Dataset
    quadrants: Dataset | None

    def for_variant(self, conditional: bool) -> Dataset:
        if not conditional:
            return self.plain
        if self.quadrants is None:
            raise ValueError(f"{self.plain.name} has no image shape, so conditional (quadrant) variants cannot run "
                             "on it; choose unconditional variants")
        return self.quadrants


def load_dataset(cfg: DataConfig) -> Dataset:
    """The data set named in ``cfg`` (before binarization)."""
    if cfg.name == "digits":
        return load_digits()
    # File formats are only imported when a path-based data set is asked for.
    from vae_priors.experiments.data import formats as data_files

    return data_files.load_named(cfg)


def load_run_data(cfg: DataConfig) -> RunData:
    """Load, binarize, cut to ``max_train`` and validate the data of a run."""
    data = binarize(load_dataset(cfg), cfg.binarize)
    if cfg.max_train:
        data = replace(data, train=data.train.subset(slice(0, cfg.max_train)))
    validate(data, cfg.likelihood)
    quadrants = quadrant_task(data, cfg.quadrants) if data.image_shape is not None else None
    return RunData(data, quadrants)


def build_pair(config: RunConfig, data: RunData, variant: str, seed: int | None = None) -> tuple[Pair, Dataset]:
    """The untrained pair for ``variant``, initialized from ``seed`` (default: the run's seed)."""
    spec = get_variant(variant)
    dataset = data.for_variant(spec.conditional)
    pyro.set_rng_seed(config.seed if seed is None else seed)
    return spec.factory(dataset, config.model, config.data.likelihood), dataset


def save_pair(pair: Pair, path: Path) -> None:
    save_torch({"model": pair.model.state_dict(), "guide": pair.guide.state_dict()}, path)


def pointwise_path(run_dir: str | Path, variant: str) -> Path:
    return Path(run_dir) / "pointwise" / f"{variant}.csv"


def write_pointwise(evaluation: Evaluation, path: Path) -> pd.DataFrame:
    """Per test point: the importance-sampled log-likelihood and ELBO, the PSIS-smoothed estimate and its k-hat.

    Paired comparisons between variants (the same test points) are made from these files.
    """
    log_w = evaluation.weights.log_w.double()
    smoothed, khat = arviz_adapter.psis(log_w.T.cpu().numpy())
    log_s = math.log(log_w.shape[0])
    frame = pd.DataFrame({"point": range(log_w.shape[1]),
                          "log_lik": evaluation.per_point_log_likelihood().cpu().numpy(),
                          "elbo": evaluation.per_point_elbo().cpu().numpy(),
                          "log_lik_psis": torch.from_numpy(smoothed).logsumexp(-1).numpy() - log_s, "khat": khat})
    write_csv(path, frame)
    return frame


def test_guide_path(run_dir: str | Path, variant: str) -> Path:
    """Where ``run`` keeps a non-amortized pair's guide fitted on the test points (decoder frozen)."""
    return Path(run_dir) / "pairs" / "test-guides" / f"{variant}.pt"


def load_test_guide(run_dir: str | Path, variant: str, pair: Pair, num_points: int) -> nn.Module | None:
    """The per-point test guide ``run`` fitted for ``variant``, or None if the run has none."""
    path = test_guide_path(run_dir, variant)
    if not path.is_file() or getattr(pair.guide, "amortized", True):
        return None
    guide = pair.guide.for_new_points(num_points)
    load_state(guide, load_torch(path, "per-point test guide"), path, f"{variant} test guide")
    return guide


def load_run(run_dir: str | Path, imports: list[str] | tuple[str, ...] = ()) -> tuple[RunConfig, RunData]:
    """The config and data of a run, with the modules that registered its pairs imported (recorded ``imports``
    and any given here)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.toml); pass a directory that "
                                "`vae-priors run` wrote")
    config = configs.load(run_dir / "config.toml")
    import_pairs([*config.imports, *imports])
    return config, load_run_data(config.data)


def load_pair(run_dir: str | Path, variant: str, config: RunConfig, data: RunData) -> tuple[Pair, Dataset]:
    """The trained pair ``variant`` of a run, on the CPU, in eval mode, with its data set."""
    path = Path(run_dir) / "pairs" / f"{variant}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: variant {variant!r} was not trained in this run")
    pair, dataset = build_pair(config, data, variant)
    state = load_torch(path, "trained pair")
    if not isinstance(state, dict) or not {"model", "guide"} <= set(state):
        raise FileFormatError(f"{path} is not a trained pair (a dict with 'model' and 'guide' state dicts); restore "
                              f"it, or rerun the variant")
    load_state(pair.model, state["model"], path, f"{variant} model")
    load_state(pair.guide, state["guide"], path, f"{variant} guide")
    pair.model.eval(), pair.guide.eval()
    return pair, dataset


def read_pointwise(run_dir: str | Path, variants: list[str]) -> dict[str, pd.DataFrame]:
    """The per-point test results of the ``variants`` that have them (a variant not yet evaluated is left out)."""
    return {name: pd.read_csv(pointwise_path(run_dir, name)) for name in variants
            if pointwise_path(run_dir, name).is_file()}


def write_findings(run_dir: str | Path, pointwise: dict[str, pd.DataFrame], *more: pd.DataFrame) -> pd.DataFrame:
    """``findings.csv``: the paired comparisons (``evaluation.comparisons``) of the held-out log-likelihoods, then
    ``more`` findings (the diagnostics' generation findings)."""
    frame = findings({name: table["log_lik"].to_numpy() for name, table in pointwise.items()})
    if more:
        frame = pd.concat([frame, *more], ignore_index=True)
    write_csv(Path(run_dir) / "findings.csv", frame)
    return frame
