"""Pairs from outside the package: a user's module named on the command line is seen by list, run and diagnose."""

from __future__ import annotations

import textwrap

import pandas as pd
import pytest
from test_cli import TINY, vae_priors

MODULE = textwrap.dedent('''
    """A user's pairs: a VAE whose guide is twice as wide, registered from outside vae_priors."""
    from vae_priors.experiments.registry import register, vae

    @register("my-vae", "a user's VAE registered from mypairs.py")
    def my_vae(data, cfg, likelihood):
        return vae(data, cfg, likelihood)
''')


@pytest.fixture(scope="module")
def outside_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("outside")
    (cwd / "mypairs.py").write_text(MODULE)
    (cwd / "tiny.toml").write_text(TINY.replace('variants = ["vae", "vae-local-guide", "cvae"]',
                                                'variants = ["my-vae", "vae"]'))
    return cwd, vae_priors("run", "tiny.toml", "--import", "mypairs", "--out", "run", "--quiet", "--no-diagnose",
                           cwd=cwd)


def test_list_shows_the_pairs_an_imported_module_registers(outside_run):
    cwd, _ = outside_run
    listed = vae_priors("list", "--import", "mypairs", cwd=cwd)
    assert listed.returncode == 0, listed.stderr
    assert "my-vae" in listed.stdout and "mypairs.py" in listed.stdout
    assert "my-vae" not in vae_priors("list", cwd=cwd).stdout


def test_run_records_the_import_and_diagnose_in_a_new_process_finds_the_pair(outside_run):
    cwd, result = outside_run
    assert result.returncode == 0, result.stderr
    assert 'imports = [\n    "mypairs",\n]' in (cwd / "run" / "config.toml").read_text() or \
        'imports = ["mypairs"]' in (cwd / "run" / "config.toml").read_text()
    diagnosed = vae_priors("diagnose", "run", "--variants", "my-vae", "--quiet", cwd=cwd)
    assert diagnosed.returncode == 0, diagnosed.stderr
    assert list(pd.read_csv(cwd / "run" / "diagnostics.csv").variant) == ["my-vae"]


def test_an_unknown_variant_error_says_how_to_import_ones_own_module(outside_run):
    cwd, _ = outside_run
    result = vae_priors("run", "tiny.toml", "--out", "other", cwd=cwd)
    assert result.returncode == 2 and "--import MODULE" in result.stderr
    assert not (cwd / "other").exists()


def test_a_module_that_does_not_exist_is_one_clear_line(tmp_path):
    result = vae_priors("list", "--import", "no_such_pairs_module", cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "no_such_pairs_module" in result.stderr and "current directory" in result.stderr
