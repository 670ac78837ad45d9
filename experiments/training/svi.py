"""One SVI loop for every pair: ``fit(pair, data, config)``.

The pair's objective (``ELBO(...)(model, guide)``, an ``nn.Module``) is minimized with Adam over its own
parameters -- never Pyro's global param store, so two variants in one process never share parameters
(pyro-ppl/pyro#1488, #3209). Each minibatch runs inside ``models.plate.subsample``, so the loss is an
unbiased estimate of the full-data negative ELBO; it is divided by N once, and every number reported is
per data point. Under torchrun each process takes its shard of every batch (``distributed``): one run, W ranks.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyro
import torch
from torch import nn
from tqdm.auto import tqdm

from vae_priors.experiments.config import RunConfig, SVIConfig
from vae_priors.experiments.data.datasets import Dataset, Split
from vae_priors.experiments.files import FileFormatError, StateMismatchError, load_state, load_torch, save_torch
from vae_priors.experiments.registry import Pair
from vae_priors.experiments.training import distributed
from vae_priors.experiments.training.contract import check_pair
from vae_priors.experiments.training.objectives import kl_weight, make_elbo
from vae_priors.models.plate import subsample


class NonFiniteLossError(RuntimeError):
    """Training produced NaN or inf; the last good checkpoint is kept."""


@dataclass
class FitResult:
    history: pd.DataFrame  # one row per epoch
    best_epoch: int
    best_elbo: float  # the monitored ELBO per point at best_epoch
    monitor: str  # "val_elbo", or "train_elbo" for a non-amortized guide (no parameters for val points)
    stopped_by: str = "epochs"  # "epochs" (svi.epochs reached), "patience" (early stopping) or "time" (max_minutes)


def _rng_state(generator: torch.Generator) -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "shuffle": generator.get_state()}


def _set_rng_state(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    generator.set_state(state["shuffle"])


@contextlib.contextmanager
def _no_nan_warning() -> Iterator[None]:
    """Silence Pyro's "Encountered NaN" warning: ``fit`` raises a ``NonFiniteLossError`` that says more."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Encountered NaN")
        yield


@torch.no_grad()
def mean_elbo(objective: nn.Module, split: Split, batch_size: int = 1024) -> float:
    """The objective's ELBO estimate per data point on a whole split (one draw per point).

    Under a process group each rank estimates its contiguous share of the points and the sums are added up, so
    every rank returns the same number.
    """
    was_training = objective.training
    objective.eval()
    rank, size = distributed.world()
    points = torch.arange(len(split), device=split.x.device).tensor_split(size)[rank]
    total = 0.0
    try:
        for index in points.split(batch_size):
            with subsample(index, len(split)), _no_nan_warning():
                total -= objective(*split.tensors(index)).item() * len(index) / len(split)
    finally:
        objective.train(was_training)
    if size > 1:
        total = distributed.sum_over_ranks(torch.tensor(total, dtype=torch.float64)).item()
    return total / len(split)


def _beta(config: SVIConfig, epoch: int) -> float:
    return 1.0 if config.warmup_epochs <= 0 else min(1.0, (epoch + 1) / config.warmup_epochs)


def svi_step(objective: nn.Module, optimizer: torch.optim.Optimizer, batch: tuple[torch.Tensor, ...],
             index: torch.Tensor, num_points: int, *, beta: float = 1.0, clip_norm: float = math.inf,
             validate: bool = True, replica: nn.Module | None = None, weight: float = 1.0) -> float:
    """One gradient step on the minibatch ``batch`` = the points ``index`` of a data set of ``num_points``.

    The objective runs inside ``subsample(index, num_points)``, so it estimates the full-data negative ELBO;
    the loss stepped on is that divided by ``num_points``. Returns it (per point) as a float.

    :param validate: run Pyro's validation checks (``pyro.validation_enabled``) during this step.
    :param replica: under a process group, the DDP wrapper of ``objective`` (``distributed.replicate``) and
        ``batch``/``index`` this rank's shard, stepped on with ``weight`` (``distributed.shard``); the value
        returned is then the global batch's loss per point, the same on every rank.
    :raises NonFiniteLossError: if the loss is NaN or inf (on any rank), before the parameters are touched.
    """
    with subsample(index, num_points), kl_weight(beta), pyro.validation_enabled(validate), _no_nan_warning():
        loss = (objective if replica is None else replica)(*batch) / num_points
    if replica is None:
        value = loss.item()
    else:  # one all-reduce: the global loss, and every rank stops together on a NaN
        value = distributed.sum_over_ranks(loss.detach() * weight / distributed.world()[1]).item()
        loss = loss * weight
    if not math.isfinite(value):
        raise NonFiniteLossError(f"non-finite loss ({value})")
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(objective.parameters(), clip_norm)
    optimizer.step()
    return value


CHECKPOINT_KEYS = ("objective", "optimizer", "rng", "state")


def _read_checkpoint(path: Path, device: torch.device) -> dict:
    saved = load_torch(path, "checkpoint", map_location=device, weights_only=False)  # RNG states are not tensors
    if not isinstance(saved, dict) or any(key not in saved for key in CHECKPOINT_KEYS):
        raise FileFormatError(f"{path} is not a training checkpoint of `vae-priors run` (it lacks "
                              f"{', '.join(CHECKPOINT_KEYS)}); delete it to train that variant from the start")
    return saved


def _load_checkpoint(path: Path, objective: nn.Module, optimizer: torch.optim.Optimizer,
                     shuffle: torch.Generator, device: torch.device) -> dict:
    """Restore nets, optimizer and RNG states from ``path``; returns the loop state (epoch, early stopping)."""
    saved = _read_checkpoint(path, device)
    load_state(objective, saved["objective"], path, "model and guide")
    try:
        optimizer.load_state_dict(saved["optimizer"])
    except (ValueError, KeyError) as err:
        raise StateMismatchError(f"{path}: the optimizer state does not match the pair's parameters ({err}); the "
                                 "code changed since the checkpoint was written -- start a new run") from None
    _set_rng_state(saved["rng"], shuffle)
    return saved["state"]


def trained_seconds(path: str | Path) -> float:
    """The training seconds of the epochs a checkpoint holds (its history's ``seconds``): what a resumed run spent
    in earlier sessions."""
    return float(sum(row["seconds"] for row in _read_checkpoint(Path(path), torch.device("cpu"))["state"]["history"]))


def check_checkpoint(pair: Pair, config: SVIConfig, path: str | Path) -> None:
    """Raise (before any training) if the checkpoint at ``path`` cannot resume ``pair``: damaged or mismatched."""
    objective = pair.objective(make_elbo(config.objective, config.num_particles))
    saved = _read_checkpoint(Path(path), torch.device("cpu"))
    original = copy.deepcopy(objective.state_dict())
    load_state(objective, saved["objective"], path, "model and guide")
    objective.load_state_dict(original)  # the check leaves the untrained pair as it was


def _non_finite(what: str, name: str, epoch: int, checkpoint: Path | None) -> NonFiniteLossError:
    where = f"; the last good state is in {checkpoint}" if checkpoint and checkpoint.exists() else ""
    return NonFiniteLossError(f"{name or 'training'}: {what} in epoch {epoch + 1}{where}. Lower svi.lr (or set a "
                              "finite svi.clip_norm), raise svi.warmup_epochs or check the data for extreme values, "
                              "and start a new run")


def fit(pair: Pair, data: Dataset, config: SVIConfig | RunConfig, *, seed: int | None = None,
        checkpoint: str | Path | None = None, resume: bool = False, name: str = "",
        progress: bool | None = None) -> FitResult:
    """Train ``pair`` on ``data.train`` and restore the state with the best monitored ELBO.

    :param config: the ``[svi]`` settings, or a whole ``RunConfig`` (its ``svi`` section and its seed are used).
    :param seed: default: the ``RunConfig``'s seed, else 0.
    :param checkpoint: file to write after every epoch (everything needed to resume: nets, optimizer,
        epoch, early-stopping state, RNG states, history); with ``resume=True`` training continues from it.
    :param progress: show a tqdm bar; by default only when stderr is a terminal.

    Training ends at ``config.epochs``, after ``config.patience`` epochs without a better monitored ELBO (not
    counted during KL warm-up), or after the first epoch that ends past ``config.max_minutes`` of recorded epoch
    time; ``FitResult.stopped_by`` says which.

    After each epoch's validation, every module of the pair with an ``end_epoch()`` method is called (the exemplar
    prior renews its cache there); the numbers it returns join that epoch's row of the history.
    :raises NonFiniteLossError: on a NaN/inf loss; the checkpoint of the last good epoch is kept.
    """
    if isinstance(config, RunConfig):
        seed = config.seed if seed is None else seed
        config = config.svi
    seed = 0 if seed is None else seed
    device = distributed.device_for(config.device)
    rank, _ = distributed.world()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("svi.device = \"cuda\" but torch sees no CUDA device; use device = \"cpu\"")
    pyro.set_rng_seed(seed)
    shuffle = torch.Generator().manual_seed(seed)
    train = data.train.to(device)
    val = data.val.to(device)
    n = len(train)
    objective = pair.objective(make_elbo(config.objective, config.num_particles)).to(device)
    replica = None if distributed.world()[1] == 1 else distributed.replicate(objective)
    optimizer = torch.optim.Adam(objective.parameters(), lr=config.lr, foreach=True)  # CPU default is a per-tensor loop
    monitor = "val_elbo" if getattr(pair.guide, "amortized", True) else "train_elbo"
    state = {"epoch": 0, "best_elbo": -math.inf, "best_epoch": -1, "wait": 0, "best_state": None, "history": []}
    checkpoint = Path(checkpoint) if checkpoint else None
    if resume:
        if checkpoint is None or not checkpoint.is_file():
            raise FileNotFoundError(f"cannot resume: no checkpoint at {checkpoint}")
        state = _load_checkpoint(checkpoint, objective, optimizer, shuffle, device)
    show = sys.stderr.isatty() if progress is None else progress
    first_epoch = state["epoch"]
    # A checkpoint written after early stopping or past the time budget has nothing left to train: resuming it must
    # not add an epoch.
    stopped_by = _stop_reason(state, config)
    last_epoch = first_epoch if stopped_by != "epochs" else config.epochs
    bar = tqdm(range(first_epoch, last_epoch), desc=name or "fit", disable=not show, leave=False)
    for epoch in bar:
        start, beta, train_total = time.perf_counter(), _beta(config, epoch), 0.0
        if rank > 0:  # its own Monte Carlo noise, the same on a resume (see distributed)
            pyro.set_rng_seed(distributed.rank_seed(seed, rank, epoch))
        objective.train()
        for step, index in enumerate(torch.randperm(n, generator=shuffle).to(device).split(config.batch_size)):
            mine, weight = distributed.shard(index)
            batch = train.tensors(mine)
            if data.dynamic_binarization:
                batch = tuple(torch.bernoulli(t) for t in batch)
            # Pyro's validation (model/guide match, site shapes, distribution arguments) runs on the first
            # step only: it catches a pair that breaks the contract, and costs ~5% of every later step.
            first = epoch == first_epoch and step == 0
            if first:  # the contract (one "z", the loop's subsampled "data" plate), before any parameter moves;
                # it leaves no trace: its draws come from a forked RNG, and the state it may change (a prior's cache
                # or neighbour table) is put back, so that a resumed fit continues as an uninterrupted one
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    before = copy.deepcopy(objective.state_dict())
                    check_pair(pair.model, pair.guide, batch, mine, n)
                    objective.load_state_dict(before)
            try:
                loss = svi_step(objective, optimizer, batch, mine, n, beta=beta, clip_norm=config.clip_norm,
                                validate=first, replica=replica, weight=weight)
            except NonFiniteLossError as err:
                raise _non_finite(str(err), name, epoch, checkpoint) from None
            train_total -= loss * len(index)
        if not all(torch.isfinite(p).all() for p in objective.parameters()):  # a finite loss, then a huge step
            raise _non_finite("non-finite parameters after the last step", name, epoch, checkpoint)
        try:
            val_elbo = mean_elbo(objective, val) if monitor == "val_elbo" else math.nan
        except ValueError as err:  # a distribution argument out of its support: the nets overflowed
            raise _non_finite(f"invalid values in the validation pass ({str(err)[:80]}...)", name, epoch,
                              checkpoint) from None
        if math.isnan(val_elbo) and monitor == "val_elbo":
            raise _non_finite("non-finite validation ELBO", name, epoch, checkpoint)
        row = {"epoch": epoch + 1, "beta": beta, "train_elbo": train_total / n, "val_elbo": val_elbo}
        for module in objective.modules():  # per-epoch upkeep and its numbers (the exemplar prior's cache)
            if callable(getattr(module, "end_epoch", None)):
                row.update(module.end_epoch())
        row["seconds"] = time.perf_counter() - start
        state["history"].append(row)
        bar.set_postfix(loss=f"{-row['train_elbo']:.2f}", val=f"{val_elbo:.2f}")
        current = row[monitor]
        if current > state["best_elbo"]:
            state.update(best_elbo=current, best_epoch=epoch + 1, wait=0,
                         best_state=copy.deepcopy(objective.state_dict()))
        elif beta == 1.0:  # patience counts only once the KL warm-up is over
            state["wait"] += 1
        state["epoch"] = epoch + 1
        if checkpoint is not None and rank == 0:  # one file, written by rank 0 (the others hold the same state)
            save_torch({"objective": objective.state_dict(), "optimizer": optimizer.state_dict(),
                         "rng": _rng_state(shuffle), "state": state}, checkpoint)
        stopped_by = distributed.from_main(_stop_reason(state, config))  # rank 0's clock decides for all ranks
        if stopped_by != "epochs":
            break
    bar.close()
    if state["best_state"] is not None:
        objective.load_state_dict(state["best_state"])
    return FitResult(pd.DataFrame(state["history"]), state["best_epoch"], state["best_elbo"], monitor, stopped_by)


def _stop_reason(state: dict, config: SVIConfig) -> str:
    """Why training must stop now ("patience" or "time"), or "epochs" when only the epoch limit ends it."""
    if state["wait"] >= config.patience:
        return "patience"
    if sum(row["seconds"] for row in state["history"]) >= 60.0 * config.max_minutes:
        return "time"
    return "epochs"
