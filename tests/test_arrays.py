"""A user's own data set from an .npz, and the issue's end-to-end case: a user's pair with a flow prior, on the
user's continuous data, through run, diagnose and the report from the CLI with no change to the project."""

from __future__ import annotations

import textwrap

import numpy as np
import pandas as pd
import pytest
from test_cli import vae_priors

from vae_priors.experiments.config import DataConfig
from vae_priors.experiments.data.arrays import load_npz_arrays


def _save(path, shape=(16,), labels=False):
    rng = np.random.default_rng(0)
    arrays = {name: rng.normal(size=(n, *shape)).astype(np.float32)
              for name, n in (("train", 120), ("valid", 30), ("test", 30))}
    if labels:
        arrays |= {f"{name}_labels": rng.integers(0, 3, size=len(a)) for name, a in list(arrays.items())}
    np.savez(path, **arrays)
    return arrays


def test_rows_and_images_load_with_their_shapes_and_labels(tmp_path):
    rows = _save(tmp_path / "rows.npz")
    data = load_npz_arrays(DataConfig(name="npz", path=str(tmp_path / "rows.npz")))
    assert data.name == "rows" and data.image_shape is None and data.x_dim == 16
    np.testing.assert_array_equal(data.val.x.numpy(), rows["valid"])
    _save(tmp_path / "images.npz", shape=(4, 6), labels=True)
    images = load_npz_arrays(DataConfig(name="npz", path=str(tmp_path / "images.npz")))
    assert images.image_shape == (4, 6) and images.x_dim == 24 and images.test.labels.shape == (30,)


def test_a_missing_split_or_a_truncated_file_is_one_clear_error(tmp_path):
    np.savez(tmp_path / "two.npz", train=np.zeros((3, 2)), test=np.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"lacks \['valid'\]; save your data with numpy.savez"):
        load_npz_arrays(DataConfig(name="npz", path=str(tmp_path / "two.npz")))
    (tmp_path / "cut.npz").write_bytes((tmp_path / "two.npz").read_bytes()[:50])
    with pytest.raises(ValueError, match="truncated or not an .npz"):
        load_npz_arrays(DataConfig(name="npz", path=str(tmp_path / "cut.npz")))


FLOW_PAIRS = textwrap.dedent('''
    """A user's pair: the project's VAE with a learned spline-flow prior, registered from outside the package."""
    import pyro.distributions as dist
    import torch
    from torch import nn

    from vae_priors.experiments.registry import register, vae

    class SplineFlowPrior(nn.Module):
        def __init__(self, latent_dim):
            super().__init__()
            self.latent_dim, self.flow = latent_dim, dist.transforms.Spline(latent_dim)

        def forward(self, batch):
            base = dist.Normal(torch.zeros(batch.shape[0], self.latent_dim), 1.0).to_event(1)
            return dist.TransformedDistribution(base, [self.flow])

    @register("vae-flow", "VAE with a spline-flow prior (a user's pair)")
    def vae_flow(data, cfg, likelihood):
        pair = vae(data, cfg, likelihood)
        pair.model.prior = SplineFlowPrior(cfg.latent_dim)
        return pair
''')

CONFIG = """
seed = 0
variants = ["vae-flow", "vae"]
imports = ["flowpairs"]
[data]
name = "npz"
path = "mine.npz"
binarize = "none"
likelihood = "gaussian"
[model]
latent_dim = 2
hidden = [16]
[svi]
epochs = 2
batch_size = 40
[eval]
num_particles = 20
"""


def test_a_users_flow_prior_pair_on_the_users_data_runs_diagnoses_and_reports(tmp_path):
    _save(tmp_path / "mine.npz")
    (tmp_path / "flowpairs.py").write_text(FLOW_PAIRS)
    (tmp_path / "mine.toml").write_text(CONFIG)
    result = vae_priors("run", "mine.toml", "--out", "run", "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    diagnostics = pd.read_csv(tmp_path / "run" / "diagnostics.csv").set_index("variant")
    flow = diagnostics.loc["vae-flow", ["log_lik", "mean_kl", "kl_qagg_p", "kl_p_qagg"]].astype(float)
    assert np.isfinite(flow).all()
    assert "vae-flow" in (tmp_path / "run" / "report.html").read_text()
    assert "vae-flow" in (tmp_path / "run" / "config.toml").read_text()
