"""The model/guide contract, checked on a real minibatch before training uses a pair.

A pair meets the contract when, traced on a minibatch ``index`` of a data set of N points inside
``subsample(index, N)`` (what the SVI loop does):

* model and guide each have one latent sample site ``"z"``, with the same event shape, one value per point
  (batch shape ``(B,)``);
* ``"z"`` and every observed site sit in the ``"data"`` plate at dim -1, and that plate is the loop's
  subsample: Pyro scales those sites by N / B. A plain ``pyro.plate("data", B)`` (as in Pyro's VAE example, where
  the batch is the data set) scales by 1, so the ELBO would be B / N of its true size and a prior or a KL term
  would be weighted N / B times too much -- it trains silently at the wrong scale.

``check_pair`` raises ``ContractError`` naming the site and the fix; the SVI loop calls it on its first step, and
``vae-priors check MODULE:FACTORY`` runs it on the embedded digits.
"""

from __future__ import annotations

import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.util import prune_subsample_sites
from torch import nn

from vae_priors.models.plate import subsample

FIX_PLATE = ('put it inside vae_priors.models.plate.data_plate(batch_size) (or pyro.plate("data", size=N, '
             'subsample=index) driven by the loop), not a plain pyro.plate("data", batch_size)')


class ContractError(ValueError):
    """A pair breaks the model/guide contract (see the module docstring)."""


def _sample_sites(trace: poutine.Trace) -> dict[str, dict]:
    return {name: site for name, site in prune_subsample_sites(trace).nodes.items() if site["type"] == "sample"}


def _data_frame(site: dict):
    return next((f for f in site["cond_indep_stack"] if f.name == "data"), None)


def _check_in_plate(role: str, site: dict, batch: int, num_points: int) -> None:
    frame = _data_frame(site)
    if frame is None:
        raise ContractError(f"the {role}'s site {site['name']!r} is not in the \"data\" plate; {FIX_PLATE}")
    if frame.dim != -1:
        raise ContractError(f"the {role}'s \"data\" plate is at dim {frame.dim}; it must be at dim -1 (the "
                            "importance-sampling code adds a particle plate at dim -2)")
    scale = float(site["scale"]) if not torch.is_tensor(site["scale"]) else float(site["scale"].max())
    expected = num_points / batch
    if abs(scale - expected) > 1e-6 * expected:
        raise ContractError(f"the {role}'s site {site['name']!r} is scaled by {scale:g} in a minibatch of {batch} "
                            f"out of {num_points} points, expected {expected:g}: its \"data\" plate is not the "
                            f"loop's subsample; {FIX_PLATE}")


def _trace(role: str, fn: nn.Module, args: tuple[torch.Tensor, ...], index: torch.Tensor,
           num_points: int) -> poutine.Trace:
    try:
        with subsample(index, num_points), pyro.validation_enabled(True):
            return poutine.trace(fn).get_trace(*args)
    except ValueError as err:  # Pyro's own shape checks: report them as what they mean for the contract
        first = str(err).strip().splitlines()[0]
        hint = (" -- a latent vector needs its dimensions in the event shape: .to_event(1)"
                if "Shape mismatch inside plate" in first else "")
        raise ContractError(f"the {role} fails on a minibatch of {len(index)} points: {first}{hint}") from err


def check_pair(model: nn.Module, guide: nn.Module, args: tuple[torch.Tensor, ...], index: torch.Tensor,
               num_points: int) -> None:
    """Trace ``guide`` and ``model`` on the minibatch ``args`` = points ``index`` of ``num_points``.

    The model runs on its own draw of z, not the guide's, so a shape mismatch is reported rather than crashing
    inside the decoder.

    :raises ContractError: on the first violation, naming the site and the fix.
    """
    batch = len(index)
    guide_trace, model_trace = _trace("guide", guide, args, index, num_points), _trace("model", model, args, index,
                                                                                       num_points)
    guide_sites, model_sites = _sample_sites(guide_trace), _sample_sites(model_trace)
    for role, sites in (("guide", guide_sites), ("model", model_sites)):
        if "z" not in sites or sites["z"]["is_observed"]:
            raise ContractError(f"the {role} has no latent sample site named 'z' (found {sorted(sites)}); "
                                "sample the latent code as pyro.sample(\"z\", ...)")
    extra = sorted(n for n, s in model_sites.items() if not s["is_observed"] and n != "z")
    if extra:
        raise ContractError(f"the model has latent sites {extra} besides 'z'; the contract allows one latent site 'z' "
                            "(observe data sites with obs=...)")
    gz, mz = guide_sites["z"]["fn"], model_sites["z"]["fn"]
    if tuple(gz.event_shape) != tuple(mz.event_shape):
        raise ContractError(f"'z' has event shape {tuple(mz.event_shape)} in the model but {tuple(gz.event_shape)} "
                            "in the guide; make them equal (e.g. .to_event(1) on a diagonal Normal)")
    for role, fn in (("model", mz), ("guide", gz)):
        if tuple(fn.batch_shape) != (batch,):
            raise ContractError(f"the {role}'s 'z' has batch shape {tuple(fn.batch_shape)} for a minibatch of {batch} "
                                f"points; expected ({batch},): one code per point, its dimensions in the event "
                                "shape (.to_event(1))")
    _check_in_plate("guide", guide_sites["z"], batch, num_points)
    _check_in_plate("model", model_sites["z"], batch, num_points)
    observed = [s for s in model_sites.values() if s["is_observed"]]
    if not observed:
        raise ContractError("the model has no observed site; observe the data with pyro.sample(..., obs=x)")
    for site in observed:
        _check_in_plate("model", site, batch, num_points)
