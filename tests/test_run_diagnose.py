"""``diagnose_run`` on a tiny run directory: every output is written, self-contained, and never silently replaced."""

from __future__ import annotations

import re

import pandas as pd
import pytest

from vae_priors.experiments import config as configs
from vae_priors.experiments.config import DataConfig, EvalConfig, ModelConfig, RunConfig, SVIConfig
from vae_priors.experiments.files import write_text
from vae_priors.experiments.runs.diagnose import COLUMNS, diagnose_run
from vae_priors.experiments.runs.layout import build_pair, load_run_data, save_pair
from vae_priors.experiments.training.svi import fit

VARIANTS = ["vae", "vae-local-guide", "cvae", "gsnn"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run of three variants (unconditional, per-point guide, conditional), 2 epochs each on 200 digits."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    config = RunConfig(seed=0, variants=VARIANTS, data=DataConfig(max_train=200),
                       model=ModelConfig(latent_dim=2, hidden=[16]), svi=SVIConfig(epochs=2, batch_size=64),
                       eval=EvalConfig(num_particles=100, local_refit_steps=20))
    data = load_run_data(config.data)
    write_text(out / "config.toml", configs.dumps(config))
    for name in VARIANTS:
        pair, dataset = build_pair(config, data, name)
        fit(pair, dataset, config.svi, seed=0, progress=False)
        save_pair(pair, out / "pairs" / f"{name}.pt")
    return out


@pytest.fixture(scope="module")
def diagnosed(run_dir):
    return run_dir, diagnose_run(run_dir)


def test_diagnose_run_writes_every_output(diagnosed):
    run_dir, table = diagnosed
    assert (run_dir / "diagnostics.csv").is_file() and (run_dir / "report.html").is_file()
    for name in VARIANTS:
        assert (run_dir / "diagnostics" / f"{name}.nc").is_file()
        assert (run_dir / "diagnostics" / f"{name}-marginals.png").is_file()
        assert (run_dir / "diagnostics" / f"{name}-reconstructions.png").is_file()
    assert (run_dir / "diagnostics" / "vae-samples.png").is_file()
    assert not (run_dir / "diagnostics" / "cvae-samples.png").exists()  # conditional: predictions instead
    assert (run_dir / "diagnostics" / "compare-p-x.png").is_file()
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".diagnostics")]  # no temporary left behind


def test_csv_has_a_row_per_variant_and_the_documented_columns(diagnosed):
    run_dir, table = diagnosed
    csv = pd.read_csv(run_dir / "diagnostics.csv")
    assert list(csv.variant) == VARIANTS
    documented = {c for group in COLUMNS for c in group.columns}
    missing = {*documented, "log_lik_se", "kl_p_qagg", "fd_q_agg", "coverage_gmm"} - set(csv.columns)
    assert not missing
    vae = csv.set_index("variant").loc["vae"]
    assert vae.log_lik >= vae.elbo  # the importance-sampled bound is tighter than the ELBO
    assert 0 <= vae.mutual_info <= vae.log_n + 0.05
    assert vae.amortization_gap > -0.5  # a local guide started at the encoder cannot do much worse
    assert pd.isna(csv.set_index("variant").loc["cvae", "fd_prior"])  # no unconditional samples for cvae


def test_conditional_rows_are_named_for_what_they_compute_and_gsnn_is_flagged(diagnosed):
    run_dir, _ = diagnosed
    csv = pd.read_csv(run_dir / "diagnostics.csv").set_index("variant")
    assert csv.loc["gsnn", "guide_is_prior"] and not csv.loc["cvae", "guide_is_prior"]
    assert csv.loc["cvae", "kl_prior_guide"] >= 0 and 0 <= csv.loc["cvae", "conditional_hole_share"] <= 1
    assert pd.isna(csv.loc["vae", "kl_prior_guide"])
    page = (run_dir / "report.html").read_text()
    assert "rate E KL(q(z|x,y)‖p(z|x))" in page and "I(index; z)" in page and "KL(q_agg‖p_agg) marginal" in page
    assert "its guide is its prior" in page
    conditional = page.split("Conditional pairs p(y|x)")[1]
    assert "I(x;z)" not in conditional  # the unconditional name is not used for x-conditioned priors


def test_report_embeds_its_images_and_references_nothing_outside(diagnosed):
    run_dir, _ = diagnosed
    page = (run_dir / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 3 * len(VARIANTS)
    assert not re.search(r"(src|href)\s*=\s*['\"]?(https?:|//|file:)", page, re.I)
    assert "http://" not in page and "https://" not in page and "<script" not in page.lower()
    assert "How to read these tables" in page and "PSIS" in page


def test_second_call_without_overwrite_fails_and_keeps_the_outputs(diagnosed):
    run_dir, _ = diagnosed
    before = {p: p.stat().st_mtime_ns for p in [run_dir / "diagnostics.csv", run_dir / "report.html",
                                                  run_dir / "diagnostics" / "vae.nc"]}
    with pytest.raises(FileExistsError, match=r"already has diagnostics.*overwrite=True.*--overwrite"):
        diagnose_run(run_dir)
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_overwrite_replaces_the_outputs(diagnosed):
    run_dir, _ = diagnosed
    old = (run_dir / "diagnostics.csv").stat().st_mtime_ns
    table = diagnose_run(run_dir, variants=["vae"], num_particles=50, overwrite=True)
    assert list(table.variant) == ["vae"]
    assert (run_dir / "diagnostics.csv").stat().st_mtime_ns != old
    assert not (run_dir / "diagnostics" / "cvae.nc").exists()  # the directory was replaced, not merged


def test_report_renders_in_a_headless_browser_at_1280_px(diagnosed, tmp_path):
    import shutil
    import subprocess

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium on this machine (Debian: apt-get install chromium) to render report.html")
    run_dir, _ = diagnosed
    shot = tmp_path / "report.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1280,4000",
                    f"--screenshot={shot}", (run_dir / "report.html").as_uri()], capture_output=True, timeout=120,
                   check=True)
    from PIL import Image

    with Image.open(shot) as image:
        assert image.size == (1280, 4000)
        pixels = image.convert("L").resize((64, 200))
        assert len(set(pixels.getdata())) > 10  # something was drawn, not a blank page
    dump = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1280,4000",
                           "--virtual-time-budget=2000", "--run-all-compositor-stages-before-draw",
                           "--dump-dom", (run_dir / "report.html").as_uri()], capture_output=True, text=True,
                          timeout=120, check=True)
    assert "Findings" in dump.stdout
