"""The model/guide contract: every registered pair meets it; each kind of violation is one error naming the fix."""

from __future__ import annotations

import textwrap

import pyro
import pyro.distributions as dist
import pytest
import torch
from test_cli import vae_priors
from torch import nn

from vae_priors.experiments.config import SVIConfig
from vae_priors.experiments.data.datasets import quadrant_task
from vae_priors.experiments.registry import VARIANTS, Pair, get_variant
from vae_priors.experiments.training.contract import ContractError, check_pair
from vae_priors.experiments.training.svi import fit
from vae_priors.models.plate import data_plate


class PlainModel(nn.Module):
    """Pyro's VAE example style: a plain plate over the batch, event shapes as given."""

    def __init__(self, x_dim: int, z_event: bool = True, plate=None):
        super().__init__()
        self.dec, self.z_event, self.plate = nn.Linear(2, x_dim), z_event, plate or (lambda b: pyro.plate("data", b))

    def forward(self, x):
        with self.plate(x.shape[0]):
            prior = dist.Normal(torch.zeros(x.shape[0], 2), 1.0)
            z = pyro.sample("z", prior.to_event(1) if self.z_event else prior)
            pyro.sample("x", dist.Bernoulli(logits=self.dec(z)).to_event(1), obs=x)


class PlainGuide(nn.Module):
    def __init__(self, x_dim: int, dim: int = 2, site: str = "z", plate=None):
        super().__init__()
        self.enc, self.dim, self.site = nn.Linear(x_dim, 2 * dim), dim, site
        self.plate = plate or (lambda b: pyro.plate("data", b))

    def forward(self, x):
        with self.plate(x.shape[0]):
            h = self.enc(x)
            pyro.sample(self.site, dist.Normal(h[:, : self.dim], h[:, self.dim :].exp()).to_event(1))


def _check(model, guide, data, batch: int = 20):
    index = torch.arange(batch)
    check_pair(model, guide, data.train.tensors(index), index, len(data.train))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_registered_pair_meets_the_contract(name, digits300, small_model_config):
    spec = get_variant(name)
    data = quadrant_task(digits300, 2) if spec.conditional else digits300
    pair = spec.factory(data, small_model_config, "bernoulli")
    _check(pair.model, pair.guide, data)


def test_a_plain_data_plate_is_caught_with_its_scale_and_the_fix(digits300):
    with pytest.raises(ContractError, match=r"guide's site 'z' is scaled by 1 .* expected 15.*data_plate"):
        _check(PlainModel(64), PlainGuide(64), digits300)
    ours = lambda b: data_plate(b)  # noqa: E731
    with pytest.raises(ContractError, match=r"model's site 'z' is scaled by 1"):
        _check(PlainModel(64), PlainGuide(64, plate=ours), digits300)
    _check(PlainModel(64, plate=ours), PlainGuide(64, plate=ours), digits300)  # the same pair, fixed: no error


def test_fit_refuses_a_pair_that_breaks_the_contract_before_any_parameter_moves(digits300):
    pair = Pair(PlainModel(64), PlainGuide(64))
    before = [p.detach().clone() for p in [*pair.model.parameters(), *pair.guide.parameters()]]
    with pytest.raises(ContractError, match="scaled by 1"):
        fit(pair, digits300, SVIConfig(epochs=1, batch_size=50))
    after = [*pair.model.parameters(), *pair.guide.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


@pytest.mark.parametrize(("model", "guide", "message"), [
    (lambda: PlainModel(64, plate=data_plate), lambda: PlainGuide(64, site="code", plate=data_plate),
     "guide has no latent sample site named 'z'"),
    (lambda: PlainModel(64, plate=data_plate), lambda: PlainGuide(64, dim=3, plate=data_plate),
     r"event shape \(2,\) in the model but \(3,\) in the guide"),
    (lambda: PlainModel(64, z_event=False, plate=data_plate), lambda: PlainGuide(64, plate=data_plate),
     r"the model fails .* Shape mismatch inside plate\('data'\) at site z.*to_event\(1\)"),
])
def test_each_violation_is_named(digits300, model, guide, message):
    with pytest.raises(ContractError, match=message):
        _check(model(), guide(), digits300)


def test_check_command_names_the_violation_in_one_line(tmp_path):
    (tmp_path / "plainpairs.py").write_text(textwrap.dedent('''
        import pyro, pyro.distributions as dist, torch
        from torch import nn
        from vae_priors.experiments.registry import Pair

        class Model(nn.Module):
            def __init__(self, d):
                super().__init__()
                self.dec = nn.Linear(2, d)
            def forward(self, x):
                with pyro.plate("data", x.shape[0]):
                    z = pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], 2), 1.0).to_event(1))
                    pyro.sample("x", dist.Bernoulli(logits=self.dec(z)).to_event(1), obs=x)

        class Guide(nn.Module):
            def __init__(self, d):
                super().__init__()
                self.enc = nn.Linear(d, 4)
            def forward(self, x):
                with pyro.plate("data", x.shape[0]):
                    h = self.enc(x)
                    pyro.sample("z", dist.Normal(h[:, :2], h[:, 2:].exp()).to_event(1))

        def factory(data, cfg, likelihood):
            return Pair(Model(data.x_dim), Guide(data.x_dim))
    '''))
    bad = vae_priors("check", "plainpairs:factory", cwd=tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "scaled by 1" in bad.stderr
    good = vae_priors("check", "vae", cwd=tmp_path)
    assert good.returncode == 0 and good.stdout.startswith("ok: vae meets the model/guide contract")
