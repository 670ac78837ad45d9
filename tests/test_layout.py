"""The package layout: one import name, every subpackage installed, and imports that only go down the stages."""

from __future__ import annotations

import ast
import configparser
import subprocess
import sys
from importlib.metadata import distribution
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("models", "guides", "experiments")

# The stages data flows through, bottom to top: a module may import from its own rank or lower ranks only.
# models/ and guides/ are the pairs' building blocks and import nothing from experiments/.
RANKS = {"config": 0, "files": 0, "data": 1, "registry": 2, "training": 3, "evaluation": 4, "diagnostics": 5,
         "reporting": 6, "runs": 7, "cli": 8, "benchmarks": 8}


def _packages_on_disk() -> set[str]:
    return {"vae_priors." + ".".join(d.relative_to(ROOT).parts) for top in FOLDERS
            for d in [ROOT / top, *(ROOT / top).rglob("*")] if d.is_dir() and (d / "__init__.py").is_file()}


def test_every_subpackage_is_listed_in_setup_cfg():
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    listed = {line.strip() for line in parser["options"]["packages"].splitlines() if line.strip()}
    assert listed == _packages_on_disk()


def test_the_distribution_claims_only_vae_priors():
    top_level = distribution("vae-priors").read_text("top_level.txt")
    assert top_level is not None and top_level.split() == ["vae_priors"]


def test_a_users_own_models_package_does_not_shadow_ours(tmp_path: Path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "__init__.py").write_text("")
    (tmp_path / "models" / "vae.py").write_text("VAE = 'the user version'\n")
    code = "import models.vae; from vae_priors.models.vae import VAE; print(models.vae.VAE, VAE.__name__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["the", "user", "version", "VAE"]


def _stage(module: str) -> str | None:
    parts = module.split(".")
    if parts[:2] != ["vae_priors", "experiments"] or len(parts) < 3:
        return None
    return parts[2]


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names]
    return [m for m in found if m.startswith("vae_priors.")]


SOURCES = sorted(p.relative_to(ROOT).as_posix() for top in FOLDERS for p in (ROOT / top).rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES)
def test_imports_only_go_down_the_stages(path: str):
    parts = Path(path).with_suffix("").parts
    own = parts[1] if parts[0] == "experiments" else None  # experiments/<stage>/... or experiments/<module>.py
    bad = []
    for module in _imports(ROOT / path):
        stage = _stage(module)
        if parts[0] in ("models", "guides"):
            if module.startswith("vae_priors.experiments"):
                bad.append(module)
            continue
        if stage is None or stage not in RANKS or own not in RANKS or stage == own:
            continue
        if RANKS[stage] > RANKS[own]:
            bad.append(module)
    assert not bad, f"{path} imports upward: {bad}"
