"""Every failure is one line without a traceback, a stopped run resumes to the same numbers, bad input leaves no
run directory, and a failed write leaves no partial file (issue 10).

The CLI's behaviour is tested through the CLI in subprocesses; the runs are tiny (150 digits, 2-3 epochs, one
thread) so the whole file takes well under a minute of CPU.
"""

from __future__ import annotations

import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_cli import cli_environment

from vae_priors.experiments.cli import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    EXIT_USAGE,
    Terminated,
    UsageError,
    describe,
    main,
)

TINY = """
seed = 3
variants = ["vae", "vae-local-guide"]
diagnose = false
[data]
max_train = 300
[model]
latent_dim = 2
hidden = [16]
[svi]
epochs = 3
batch_size = 50
[eval]
num_particles = 10
local_refit_steps = 5
"""
TIMING = ["fit_seconds", "eval_seconds"]


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "vae_priors.experiments.cli", *args]


def environment(cwd: Path) -> dict[str, str]:
    return {k: v for k, v in cli_environment(cwd).items() if k != "VAE_PRIORS_DEBUG"}


def vae_priors(*args: str, cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command(*args), cwd=cwd, env=environment(cwd), capture_output=True, text=True,
                          timeout=300, **kwargs)


def assert_one_line(result: subprocess.CompletedProcess, status: int, *phrases: str) -> str:
    """The command failed with ``status`` and said so in one ``vae-priors: ...`` line holding ``phrases``."""
    assert result.returncode == status, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vae-priors: "), result.stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    return lines[0]


def assert_same_results(run: Path, reference: Path) -> None:
    """metrics.csv and history.csv equal, number for number, apart from the timings."""
    pd.testing.assert_frame_equal(pd.read_csv(run / "metrics.csv").drop(columns=TIMING),
                                  pd.read_csv(reference / "metrics.csv").drop(columns=TIMING), check_exact=True)
    pd.testing.assert_frame_equal(pd.read_csv(run / "history.csv").drop(columns="seconds"),
                                  pd.read_csv(reference / "history.csv").drop(columns="seconds"), check_exact=True)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A directory with tiny.toml and ``full``: the uninterrupted run every stopped run must reproduce."""
    cwd = tmp_path_factory.mktemp("reliability")
    (cwd / "tiny.toml").write_text(TINY)
    result = vae_priors("run", "tiny.toml", "--out", "full", "--threads", "1", "--quiet", cwd=cwd)
    assert result.returncode == 0, result.stderr
    return cwd


def copy_run(workdir: Path, name: str) -> Path:
    target = workdir / name
    shutil.copytree(workdir / "full", target)
    return target


# ------------------------------------------------------------------------------------- bad input: no directory

@pytest.mark.parametrize("config, args, phrase", [
    (TINY, ["--variants", ","], "--variants ',' names no variant"),
    (TINY, ["--seed", "-1"], "seed must be >= 0"),
    (TINY.replace("epochs = 3", "epochs = 3\nlr = inf"), [], "svi.lr must be a finite number > 0"),
    (TINY.replace("epochs = 3", "epoch = 3"), [], "unknown key svi.epoch;"),
    ('[data]\nname = "linear-gaussian"\nbinarize = "none"\nlikelihood = "gaussian"\n', ["--variants", "vae,cvae"],
     "conditional (quadrant) variants cannot run"),
    ("# caf\xe9\n" + TINY, [], "is not UTF-8 text"),
])
def test_bad_input_is_one_line_exit_2_and_leaves_no_run_directory(tmp_path, config, args, phrase):
    (tmp_path / "bad.toml").write_bytes(config.encode("latin-1"))
    result = vae_priors("run", "bad.toml", "--out", "run", *args, cwd=tmp_path)
    assert_one_line(result, EXIT_USAGE, phrase)
    assert not (tmp_path / "run").exists()


def test_a_config_path_that_is_a_directory_gets_its_own_message(tmp_path):
    (tmp_path / "configs").mkdir()
    assert_one_line(vae_priors("run", "configs", "--out", "run", cwd=tmp_path), EXIT_USAGE, "configs is a directory")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 half a zip"], ids=["empty", "truncated"])
def test_an_empty_or_truncated_npz_is_one_line_naming_the_file(tmp_path, content):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "binarized_mnist.npz").write_bytes(content)
    (tmp_path / "bad.toml").write_text('[data]\nname = "binarized-mnist"\npath = "data"\n')
    result = vae_priors("run", "bad.toml", "--out", "run", cwd=tmp_path)
    assert_one_line(result, EXIT_USAGE, "binarized_mnist.npz is ", "copy or download the file again")
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------ failures

def test_a_nan_loss_is_one_line_that_suggests_lowering_the_learning_rate(tmp_path):
    (tmp_path / "nan.toml").write_text(TINY.replace("epochs = 3", "epochs = 3\nlr = 1e12\nclip_norm = inf"))
    result = vae_priors("run", "nan.toml", "--out", "run", "--variants", "vae", "--threads", "1", cwd=tmp_path)
    assert_one_line(result, EXIT_FAILURE, "vae: non-finite", "Lower svi.lr")


def test_a_disk_full_checkpoint_write_leaves_no_partial_file_and_names_the_path(workdir):
    def small_files() -> None:  # a file-size limit fails the write as a full disk would (EFBIG instead of ENOSPC)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (16_384, 16_384))

    result = vae_priors("run", "tiny.toml", "--out", "full-disk", "--threads", "1", "--quiet", cwd=workdir,
                        preexec_fn=small_files)
    checkpoints = workdir / "full-disk" / "checkpoints"
    assert_one_line(result, EXIT_FAILURE, f"could not write {Path('full-disk', 'checkpoints', 'vae.pt')}",
                    "ulimit -f", "vae-priors run --resume full-disk")
    assert list(checkpoints.iterdir()) == []  # neither a partial vae.pt nor a leftover temporary file
    assert (workdir / "full-disk" / "config.toml").is_file()


def test_a_corrupt_checkpoint_is_refused_in_one_line_before_anything_is_trained(workdir):
    run = copy_run(workdir, "corrupt-checkpoint")
    (run / "metrics.csv").unlink()
    checkpoint = run / "checkpoints" / "vae.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:200])
    result = vae_priors("run", "--resume", str(run), "--threads", "1", cwd=workdir)
    assert_one_line(result, EXIT_USAGE, f"cannot read checkpoint {checkpoint}", "truncated")


def test_a_checkpoint_that_does_not_match_the_pair_is_refused(workdir):
    run = copy_run(workdir, "mismatch")
    (run / "metrics.csv").unlink()
    config = run / "config.toml"
    config.write_text(config.read_text().replace("hidden = [\n    16,\n]", "hidden = [\n    32,\n]"))
    result = vae_priors("run", "--resume", str(run), "--threads", "1", cwd=workdir)
    assert_one_line(result, EXIT_USAGE, "checkpoints/vae.pt does not match", "shape")


def test_a_truncated_pair_file_under_diagnose_is_one_line(workdir):
    run = copy_run(workdir, "corrupt-pair")
    pair = run / "pairs" / "vae.pt"
    pair.write_bytes(pair.read_bytes()[:-100])
    result = vae_priors("diagnose", str(run), "--particles", "10", cwd=workdir)
    assert_one_line(result, EXIT_USAGE, f"cannot read trained pair {pair}")


@pytest.mark.parametrize("args, phrase", [
    (["tiny.toml", "--resume", "full"], "cannot be combined with CONFIG"),
    (["--resume", "full", "--epochs", "5", "--out", "x"], "cannot be combined with --out, --epochs"),
    (["--resume", "."], "has no config.toml"),
])
def test_resume_refuses_settings_that_would_change_the_run_and_directories_that_are_not_runs(workdir, args, phrase):
    assert_one_line(vae_priors("run", *args, cwd=workdir), EXIT_USAGE, phrase)


# ----------------------------------------------------------------------------------------- stop and resume

def start_and_stop_after_first_checkpoint(workdir: Path, out: str, sig: signal.Signals) -> subprocess.Popen:
    """Start a real run and send ``sig`` as soon as its first variant has written a checkpoint."""
    # A shell without job control starts background jobs with SIGINT ignored, and children inherit that (CI run
    # with `&`): give the run the disposition a terminal's Ctrl-C meets, so Python installs its handler.
    process = subprocess.Popen(command("run", "tiny.toml", "--out", out, "--threads", "1", "--quiet"), cwd=workdir,
                               env=environment(workdir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    checkpoint = workdir / out / "checkpoints" / "vae.pt"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(sig)
    process.wait(timeout=60)
    return process


def stop_mid_run(workdir: Path, name: str, sig: signal.Signals) -> tuple[subprocess.Popen, str]:
    """``start_and_stop_after_first_checkpoint`` until the signal lands before the run ends (the tiny run finishes
    about a second after its first checkpoint; on a loaded machine the signal can come later: exit 0, nothing to
    test, so that attempt is repeated in a fresh directory)."""
    for attempt in range(4):
        out = f"{name}{attempt}"
        process = start_and_stop_after_first_checkpoint(workdir, out, sig)
        if process.returncode != 0:
            break
    return process, out


def test_a_killed_run_resumed_gives_the_metrics_of_an_uninterrupted_run(workdir):
    process, out = stop_mid_run(workdir, "killed", signal.SIGKILL)
    assert process.returncode == -signal.SIGKILL
    run = workdir / out
    assert (run / "checkpoints" / "vae.pt").is_file() and not (run / "metrics.csv").exists()
    result = vae_priors("run", "--resume", out, "--threads", "1", "--quiet", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert_same_results(run, workdir / "full")
    metrics, history = pd.read_csv(run / "metrics.csv"), pd.read_csv(run / "history.csv")
    for name, fit_seconds in zip(metrics.variant, metrics.fit_seconds, strict=True):  # earlier sessions counted
        assert fit_seconds >= history.seconds[history.variant == name].sum()
    for name in ("config.toml", "provenance.toml", "pairs/vae.pt", "pairs/vae-local-guide.pt",
                 "pointwise/vae.csv", "pointwise/vae-local-guide.csv", "checkpoints/vae-local-guide.pt"):
        assert (run / name).is_file(), name


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, EXIT_INTERRUPTED), (signal.SIGTERM, EXIT_TERMINATED)],
                         ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_keeps_the_checkpoint_prints_the_resume_command_and_exits_130_or_143(workdir, sig, status):
    process, out = stop_mid_run(workdir, f"interrupted-{sig.name}", sig)
    assert process.returncode == status
    stderr = process.stderr.read()
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert stderr.startswith("vae-priors: interrupted:") and f"`vae-priors run --resume {out}`" in stderr
    assert (workdir / out / "checkpoints" / "vae.pt").is_file()
    result = vae_priors("run", "--resume", out, "--threads", "1", "--quiet", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert_same_results(workdir / out, workdir / "full")


def test_sigterm_during_diagnose_leaves_no_work_folder_and_the_old_outputs_as_they_were(workdir):
    """``diagnose --overwrite`` builds its outputs in a hidden folder; SIGTERM (a scheduler, torchrun stopping the
    other ranks) unwinds like Ctrl-C, so the folder goes and the previous outputs stay."""
    run = copy_run(workdir, "diagnosed")
    assert vae_priors("diagnose", str(run), "--quiet", cwd=workdir).returncode == 0
    before = (run / "diagnostics.csv").read_bytes()
    for _ in range(4):  # the tiny diagnose may end before the signal lands: then try again
        process = subprocess.Popen(command("diagnose", str(run), "--overwrite", "--quiet"), cwd=workdir,
                                   env=environment(workdir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while not list(run.glob(".diagnostics-*")) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
        if process.returncode != 0:
            break
        before = (run / "diagnostics.csv").read_bytes()  # it finished: its outputs are the ones to keep
    assert process.returncode == EXIT_TERMINATED, process.stderr.read()
    assert process.stderr.read().strip() == "vae-priors: interrupted: stopped by SIGTERM"
    assert not list(run.glob(".diagnostics-*")) and not list(run.glob(".diagnostics.old-*"))
    assert (run / "diagnostics.csv").read_bytes() == before


def test_resuming_a_finished_run_changes_no_number(workdir):
    run = copy_run(workdir, "finished")
    result = vae_priors("run", "--resume", str(run), "--threads", "1", "--quiet", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert "2 of 2 variants finished" in result.stdout
    assert_same_results(run, workdir / "full")


def test_a_raised_time_budget_continues_the_variants_it_stopped_to_the_numbers_of_an_unbudgeted_run(workdir):
    """``--resume --max-minutes`` may change the budget: the clock only chose where to stop, so a variant stopped by
    time goes on from its checkpoint and ends where a run without the budget ends; config.toml records the new one."""
    short = vae_priors("run", "tiny.toml", "--out", "budgeted", "--max-minutes", "1e-9", "--threads", "1", "--quiet",
                       cwd=workdir)
    assert short.returncode == 0, short.stderr
    run = workdir / "budgeted"
    stopped = pd.read_csv(run / "metrics.csv")
    assert list(stopped.stopped_by) == ["time", "time"] and list(stopped.epochs) == [1, 1]
    result = vae_priors("run", "--resume", "budgeted", "--max-minutes", "inf", "--threads", "1", "--quiet",
                        cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert "0 of 2 variants finished" in result.stdout
    assert "vae: stopped by time" in result.stderr and "continues from its last checkpoint" in result.stderr
    assert_same_results(run, workdir / "full")
    assert "max_minutes = inf" in (run / "config.toml").read_text()


def test_a_raised_budget_without_the_checkpoint_to_continue_is_one_line_and_changes_nothing(workdir):
    short = vae_priors("run", "tiny.toml", "--out", "no-checkpoint", "--max-minutes", "1e-9", "--threads", "1",
                       "--quiet", cwd=workdir)
    assert short.returncode == 0, short.stderr
    run = workdir / "no-checkpoint"
    (run / "checkpoints" / "vae.pt").unlink()
    config, metrics = (run / "config.toml").read_bytes(), (run / "metrics.csv").read_bytes()
    result = vae_priors("run", "--resume", "no-checkpoint", "--max-minutes", "5", "--threads", "1", cwd=workdir)
    assert_one_line(result, EXIT_USAGE, "vae stopped by its time budget", "checkpoints/vae.pt is gone")
    assert (run / "config.toml").read_bytes() == config and (run / "metrics.csv").read_bytes() == metrics


# ---------------------------------------------------------------------------------- the boundary in-process

@pytest.mark.parametrize("error, status, phrases", [
    (PermissionError(13, "Permission denied", "/read-only/run"), EXIT_FAILURE, ["Permission denied: /read-only/run"]),
    (OSError(28, "No space left on device", "/full/x.pt"), EXIT_FAILURE, ["No space left on device: /full/x.pt"]),
    (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), EXIT_USAGE, ["UTF-8"]),
    (EOFError("Ran out of input"), EXIT_USAGE, ["truncated", "VAE_PRIORS_DEBUG=1"]),
    (KeyboardInterrupt(), EXIT_INTERRUPTED, ["Ctrl-C"]),
    (Terminated(), EXIT_TERMINATED, ["SIGTERM"]),
    (ZeroDivisionError("division by zero"), EXIT_FAILURE, ["unexpected ZeroDivisionError", "VAE_PRIORS_DEBUG=1"]),
    (UsageError("bad\nflag"), EXIT_USAGE, ["bad flag"]),
])
def test_every_exception_becomes_one_line_with_its_exit_status(error, status, phrases):
    message, code = describe(error)
    assert code == status and "\n" not in message
    for phrase in phrases:
        assert phrase in message


def test_a_stopped_run_names_the_resume_command():
    error = KeyboardInterrupt()
    error.run_dir = Path("runs/my run")
    message, code = describe(error)
    assert code == EXIT_INTERRUPTED and "`vae-priors run --resume 'runs/my run'`" in message


def test_vae_priors_debug_shows_the_traceback(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--resume", "missing"]) == EXIT_USAGE
    assert "no such directory" in capsys.readouterr().err
    monkeypatch.setenv("VAE_PRIORS_DEBUG", "1")
    with pytest.raises(UsageError, match="no such directory"):
        main(["run", "--resume", "missing"])


def test_a_failed_write_removes_its_temporary_file_and_names_the_path(tmp_path):
    from vae_priors.experiments.files import WriteError, save_torch

    script = f"""
import resource, signal, torch
from vae_priors.experiments.files import save_torch
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
save_torch(torch.zeros(100_000), {str(tmp_path / "big.pt")!r})
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and f"WriteError: could not write {tmp_path / 'big.pt'}" in result.stderr
    assert list(tmp_path.iterdir()) == []
    save_torch(np.zeros(3), tmp_path / "small.pt")  # the same writer without a limit succeeds
    assert [p.name for p in tmp_path.iterdir()] == ["small.pt"] and issubclass(WriteError, OSError)
