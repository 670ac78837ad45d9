"""The ArviZ adapter: PSIS on the right axis, ELPDData that az.compare accepts, NetCDF round trip."""

import numpy as np
import pytest

from vae_priors.experiments.diagnostics import arviz_adapter
from vae_priors.experiments.files import FileFormatError


def _pareto_log_weights(k: float, num: int, rng) -> np.ndarray:
    """log of draws with a generalized-Pareto tail of shape k (k = 0: exponential)."""
    u = rng.uniform(size=num)
    return np.log(-np.log(u) if k == 0 else (u**-k - 1) / k)


def test_psis_reads_samples_on_the_last_axis_and_finds_each_points_tail():
    rng = np.random.default_rng(0)
    shapes = [0.0, 0.9, 0.0, 0.9, 0.0]
    log_w = np.stack([_pareto_log_weights(k, 4000, rng) for k in shapes])  # (N=5, S=4000)
    smoothed, khat = arviz_adapter.psis(log_w)
    assert smoothed.shape == (5, 4000) and khat.shape == (5,)
    np.testing.assert_allclose(khat, shapes, atol=0.2)
    with pytest.raises(ValueError, match="transpose"):
        arviz_adapter.psis(log_w.T[:, :5])  # (S, N) with few "samples" per row: the wrong axis


def test_psis_keeps_constant_weights_and_reports_no_tail():
    smoothed, khat = arviz_adapter.psis(np.full((2, 100), -3.0))
    assert np.all(smoothed == -3.0) and np.all(khat == -np.inf)


def test_elpd_data_is_accepted_by_compare_and_ranks_the_higher_log_likelihood_first():
    rng = np.random.default_rng(1)
    better = arviz_adapter.elpd_data(rng.normal(-10, 1, 50), rng.uniform(0, 0.4, 50), 1000)
    worse = arviz_adapter.elpd_data(rng.normal(-12, 1, 50), rng.uniform(0.5, 0.9, 50), 1000)
    assert float(better["elpd_loo"]) == pytest.approx(float(better["loo_i"].sum()))
    table = arviz_adapter.compare({"worse": worse, "better": better})
    assert list(table.index) == ["better", "worse"] and table.loc["worse", "dse"] > 0
    with pytest.raises(ValueError, match="same test split"):
        arviz_adapter.compare({"a": better, "b": arviz_adapter.elpd_data(np.zeros(3), np.zeros(3))})


def _idata(rng, s=20, n=3, d=2, n_all=12):
    return arviz_adapter.to_inference_data(
        rng.normal(size=(s, n, d)), rng.normal(size=(s, n, d)), *(rng.normal(size=(s, n)) for _ in range(4)),
        observed=rng.normal(size=(n, 5)), obs_index=np.array([4, 8, 9]), q_agg_draws=rng.normal(size=(30, d)),
        prior_agg_draws=rng.normal(size=(30, d)),
        held_out={"log_lik_psis": rng.normal(-20, 1, size=n_all), "khat": rng.uniform(0, 0.9, size=n_all)},
        constant=rng.normal(size=(n, 4)), attrs={"variant": "vae", "data": "digits"})


def test_inference_data_round_trips_through_netcdf_with_every_group_and_attribute(tmp_path):
    idata = _idata(np.random.default_rng(2))
    path = arviz_adapter.write_netcdf(idata, tmp_path / "variant.nc")
    back = arviz_adapter.read_netcdf(path)
    assert set(back.groups()) == {"posterior", "prior", "importance_weights", "held_out", "observed_data",
                                  "constant_data", "aggregated_posterior", "aggregated_prior"}
    np.testing.assert_allclose(back.posterior["z"].values, idata.posterior["z"].values)
    assert back.posterior["z"].dims == ("chain", "draw", "obs", "latent")
    assert list(back.prior["obs"].values) == [4, 8, 9]
    assert back.held_out["khat"].shape == (12,)  # every test point, not only the stored draws' subset
    assert back.posterior.attrs["variant"] == "vae" and back.posterior.attrs["inference_library"] == "pyro"
    assert not list(tmp_path.glob(".variant.nc.*"))  # no temporary file left behind


def test_arviz_loo_compare_and_plot_khat_refuse_the_file_and_work_on_its_held_out_estimate(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    rng = np.random.default_rng(3)
    a, b = (arviz_adapter.read_netcdf(arviz_adapter.write_netcdf(_idata(rng), tmp_path / f"{v}.nc")) for v in "ab")
    az = arviz_adapter.az
    for call in (lambda: az.loo(a), lambda: az.compare({"a": a, "b": b}), lambda: az.plot_khat(a)):
        with pytest.raises((TypeError, ValueError), match="log likelihood|log_likelihood|ELPD computation|khat data"):
            call()  # no log_likelihood group: the harmonic-mean trap is closed
    elpd_a = arviz_adapter.elpd_from_inference_data(a, num_samples=20)
    assert float(elpd_a["elpd_loo"]) == pytest.approx(float(a.held_out["log_lik_psis"].sum()))
    table = arviz_adapter.compare({"a": elpd_a, "b": arviz_adapter.elpd_from_inference_data(b, 20)})
    assert set(table.index) == {"a", "b"} and (table["dse"] >= 0).all()
    az.plot_khat(elpd_a)


@pytest.mark.parametrize("content", [b"", b"CDF\x01 truncated"], ids=["empty", "truncated"])
def test_a_damaged_netcdf_file_is_one_error_naming_it(tmp_path, content):
    path = tmp_path / "vae.nc"
    path.write_bytes(content)
    with pytest.raises(FileFormatError, match=r"cannot read .*vae.nc as NetCDF"):
        arviz_adapter.read_netcdf(path)
