"""The ``vae-priors`` command through a subprocess: list, run (+ diagnose), and bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from vae_priors.experiments.registry import VARIANTS

TINY = """
seed = 1
variants = ["vae", "vae-local-guide", "cvae"]
[data]
max_train = 150
[model]
latent_dim = 2
hidden = [16]
[svi]
epochs = 2
batch_size = 50
[eval]
num_particles = 20
local_refit_steps = 5
"""


def cli_environment(cwd: Path) -> dict[str, str]:
    """A CLI subprocess's environment: one torch thread and caches under ``cwd``, except matplotlib's font cache,
    which is this process's (built here once). Built afresh in every subprocess it cost ~0.7 s a launch, and when
    building took over 5 s (two test workers on 2 busy cores) matplotlib printed a line on stderr that the
    one-line-error tests count."""
    import matplotlib.font_manager  # noqa: F401  (builds the font cache if there is none)

    return {**os.environ, "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(cwd / ".cache"),
            "MPLCONFIGDIR": matplotlib.get_cachedir()}


def vae_priors(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = cli_environment(cwd)
    return subprocess.run([sys.executable, "-m", "vae_priors.experiments.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_list_prints_every_registered_variant(tmp_path):
    result = vae_priors("list", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    listed = [line.split()[0] for line in result.stdout.splitlines()]
    assert listed == list(VARIANTS)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    cwd = tmp_path_factory.mktemp("cli")
    (cwd / "tiny.toml").write_text(TINY)
    return cwd, vae_priors("run", "tiny.toml", "--out", "run", "--quiet", cwd=cwd)


def test_run_trains_evaluates_diagnoses_and_writes_the_run_directory(tiny_run):
    cwd, result = tiny_run
    assert result.returncode == 0, result.stderr
    run = cwd / "run"
    for name in ("config.toml", "history.csv", "metrics.csv", "diagnostics.csv", "report.html"):
        assert (run / name).is_file(), name
    metrics = pd.read_csv(run / "metrics.csv")
    assert list(metrics.variant) == ["vae", "vae-local-guide", "cvae"]
    assert metrics.test_log_lik.notna().all() and (metrics.test_log_lik < 0).all()
    assert (pd.read_csv(run / "history.csv").groupby("variant").size() == 2).all()
    for variant in metrics.variant:
        assert (run / "pairs" / f"{variant}.pt").is_file() and (run / "checkpoints" / f"{variant}.pt").is_file()
    assert "test log-lik (IS)" in result.stdout and "I(x;z)" in result.stdout


def test_run_writes_and_prints_the_paired_findings_of_its_pointwise_results(tiny_run):
    cwd, result = tiny_run
    found = pd.read_csv(cwd / "run" / "findings.csv")
    found = found[found.measure == "test log-likelihood (IS)"].reset_index(drop=True)
    assert list(found.variant) == ["vae"] and list(found.baseline) == ["vae-local-guide"]
    a, b = (pd.read_csv(cwd / "run" / "pointwise" / f"{v}.csv").log_lik for v in ("vae", "vae-local-guide"))
    assert found.difference[0] == pytest.approx((a - b).mean())
    assert found.se[0] == pytest.approx((a - b).std(ddof=1) / len(a) ** 0.5)
    assert "Findings" in result.stdout and found.finding[0] in result.stdout


def test_diagnose_adds_the_generation_findings_of_each_unconditional_variant(tiny_run):
    cwd, _ = tiny_run
    found = pd.read_csv(cwd / "run" / "findings.csv")
    generation = found[found.question.str.startswith("Generate from")]
    assert set(generation.baseline) == {"vae with z ~ p(z)", "vae-local-guide with z ~ p(z)"}
    assert len(generation) == 4 and generation.se.gt(0).all()
    diagnostics = pd.read_csv(cwd / "run" / "diagnostics.csv").set_index("variant")
    assert diagnostics.loc["vae", "gen_log_lik_prior"] == pytest.approx(
        diagnostics.loc["vae", "gen_log_lik_q_agg"] - generation.difference.iloc[0])


def test_run_refuses_an_existing_run_directory_and_changes_nothing(tiny_run):
    cwd, _ = tiny_run
    before = {p: p.stat().st_mtime_ns for p in (cwd / "run").rglob("*")}
    result = vae_priors("run", "tiny.toml", "--out", "run", "--quiet", cwd=cwd)
    assert result.returncode == 2
    assert "already exists" in result.stderr and "--out" in result.stderr
    assert {p: p.stat().st_mtime_ns for p in (cwd / "run").rglob("*")} == before


def test_diagnose_refuses_to_overwrite_without_the_flag(tiny_run):
    cwd, _ = tiny_run
    result = vae_priors("diagnose", "run", "--quiet", cwd=cwd)
    assert result.returncode == 2 and "--overwrite" in result.stderr


def test_diagnose_overwrite_replaces_an_existing_result(tiny_run):
    cwd, _ = tiny_run
    result = vae_priors("diagnose", "run", "--overwrite", "--quiet", cwd=cwd)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and (cwd / "run" / "report.html").is_file()
    assert not [p.name for p in (cwd / "run").iterdir() if p.name.startswith(".diagnostics")]


@pytest.mark.parametrize("config, message", [
    ("[svi]\nlearning_rate = 1\n", "unknown key svi.learning_rate;"),
    ("variants = [\"vae\", \"no-such-variant\"]\n", "unknown variant 'no-such-variant'"),
    ("[data]\nname = \"mnist\"\npath = \"does/not/exist\"\n", "does/not/exist"),
    ("[data]\nlikelihood = \"poisson\"\n", "data.likelihood = 'poisson' is not allowed; choose one of"),
    ("[svi]\nobjective = \"elbo\"\n", "svi.objective = 'elbo' is not allowed"),
    ("[svi]\nepochs = 0\n", "svi.epochs must be > 0"),
])
def test_bad_input_exits_2_with_one_clear_line_and_writes_nothing(tmp_path, config, message):
    (tmp_path / "bad.toml").write_text(config)
    result = vae_priors("run", "bad.toml", "--out", "run", cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "run").exists()


def test_diagnose_on_a_directory_that_is_not_a_run_is_a_clear_error(tmp_path):
    result = vae_priors("diagnose", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2 and "not a run directory" in result.stderr


@pytest.mark.parametrize("flag", ["--threads", "--particles"])
def test_diagnose_refuses_a_count_that_is_not_positive_in_one_line(tmp_path, flag):
    result = vae_priors("diagnose", str(tmp_path), flag, "0", cwd=tmp_path)
    assert result.returncode == 2 and f"{flag} must be > 0" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_findings_command_recomputes_the_paired_findings_from_pointwise_files_alone(tiny_run):
    cwd, _ = tiny_run
    written = pd.read_csv(cwd / "run" / "findings.csv")
    (cwd / "run" / "findings.csv").unlink()
    result = vae_priors("findings", "run", cwd=cwd)
    assert result.returncode == 0, result.stderr
    again = pd.read_csv(cwd / "run" / "findings.csv")
    held_out = written[written.measure == "test log-likelihood (IS)"].reset_index(drop=True)
    pd.testing.assert_frame_equal(again, held_out)
    assert "vae is ahead of vae-local-guide" in result.stdout or "no detectable difference" in result.stdout


def test_bench_evaluation_reevaluates_a_trained_pair_of_a_run(tiny_run):
    """`vae-priors bench evaluation RUN_DIR` times the held-out evaluation of a saved pair; with the run's own
    draws (same seed and particles) it reproduces the run's test log-likelihood."""
    cwd, _ = tiny_run
    result = vae_priors("bench", "evaluation", "run", "--variant", "vae", "--particles", "20", "--pointwise",
                        "again.csv", cwd=cwd)
    assert result.returncode == 0, result.stderr
    again, saved = pd.read_csv(cwd / "again.csv"), pd.read_csv(cwd / "run" / "pointwise" / "vae.csv")
    pd.testing.assert_frame_equal(again, saved, rtol=1e-6)
    metrics = pd.read_csv(cwd / "run" / "metrics.csv").set_index("variant")
    printed = float(result.stdout.split("test log-lik ")[1].split()[0])
    assert printed == pytest.approx(metrics.loc["vae", "test_log_lik"], abs=1e-3)
    assert "1 process(es)" in result.stdout


# the tiny config with the exemplar prior on its scalable (cached) path
SCALABLE_EXEMPLAR = (TINY.replace('["vae", "vae-local-guide", "cvae"]', '["vae", "vae-exemplar"]')
                     .replace("hidden = [16]", 'hidden = [16]\nexemplar_path = "scalable"\nexemplar_neighbors = 2\n'
                                               "exemplar_subset = 20"))


def test_bench_exemplar_staleness_reports_each_source_of_error_at_a_runs_checkpoint(tmp_path):
    (tmp_path / "ex.toml").write_text(SCALABLE_EXEMPLAR.replace('["vae", "vae-exemplar"]', '["vae-exemplar"]'))
    assert vae_priors("run", "ex.toml", "--out", "run", "--quiet", "--no-diagnose", cwd=tmp_path).returncode == 0
    history = pd.read_csv(tmp_path / "run" / "history.csv")
    assert history.prior_error.notna().all()  # measured at the end of every epoch of the run
    result = vae_priors("bench", "exemplar-staleness", "run", "--steps", "3", "--points", "40", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for line in ("cached, all N", "estimator", "refresh-time components, all N", "moved by the point's drift",
                 "current components, same table", "exact kNN head", "recall@2", "median step"):
        assert line in result.stdout, line
    errors = [float(part.split()[0]) for part in result.stdout.split("|err|")[1:]]
    assert len(errors) == 6 and all(0 <= e < 100 for e in errors)


def test_bench_exemplar_heads_compares_head_choices_against_the_exact_mixture_of_epoch_components(tmp_path):
    config = SCALABLE_EXEMPLAR.replace('["vae", "vae-exemplar"]', '["vae-exemplar"]')
    (tmp_path / "ex.toml").write_text(config.replace("exemplar_subset = 20", 'exemplar_subset = 20\n'
                                                     'exemplar_components = "epoch"'))
    assert vae_priors("run", "ex.toml", "--out", "run", "--quiet", "--no-diagnose", cwd=tmp_path).returncode == 0
    history = pd.read_csv(tmp_path / "run" / "history.csv")
    assert history.prior_lag.notna().all()  # how far each epoch's prior is from the current encoder's
    result = vae_priors("bench", "exemplar-heads", "run", "--points", "40", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "components epoch" in result.stdout
    for line in ("nearest of its own component", "nearest of its current mean", "nearest of z", "IVF", "vae step",
                 "the run's estimate (", "draws around z, 256 clusters"):
        assert line in result.stdout, line
    errors = [float(part.split()[0]) for part in result.stdout.split("|err|")[1:]]
    assert len(errors) == 13 and all(0 <= e < 100 for e in errors)


def test_bench_mixture_prior_epoch_cost_times_both_variants_through_fit_on_the_threads_asked(tmp_path):
    (tmp_path / "ex.toml").write_text(SCALABLE_EXEMPLAR)
    result = vae_priors("bench", "mixture-prior", "--epoch-cost", "ex.toml", "--epochs", "2", "--rounds", "1",
                        "--threads", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "1 thread(s)" in result.stdout
    lines = [line for line in result.stdout.splitlines() if "per epoch" in line]
    assert [line.split()[0] for line in lines] == ["vae", "vae-exemplar"] and lines[0].endswith("1.00x vae")


def test_bench_exemplar_heads_refuses_no_clusters_or_no_draws_before_loading_a_run(tmp_path):
    for flags, shown in ((["--clusters", "0"], "[0]"), (["--cluster-draws", "0"], "and 0")):
        result = vae_priors("bench", "exemplar-heads", "no-such-run", *flags, cwd=tmp_path)
        assert result.returncode != 0 and "--clusters and --cluster-draws must be >= 1" in result.stderr, flags
        assert shown in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_bench_mixture_prior_epoch_cost_refuses_a_skip_that_leaves_no_epoch(tmp_path):
    (tmp_path / "ex.toml").write_text(SCALABLE_EXEMPLAR)
    result = vae_priors("bench", "mixture-prior", "--epoch-cost", "ex.toml", "--epochs", "2", "--skip", "2",
                        cwd=tmp_path)
    assert result.returncode != 0 and "--skip 2 leaves no epoch of 2" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
