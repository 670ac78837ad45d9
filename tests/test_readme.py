"""The README's example of a brand-new pair runs through fit, evaluation and the diagnostics unchanged."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from vae_priors.experiments.config import SVIConfig
from vae_priors.experiments.diagnostics.point import point_diagnostics
from vae_priors.experiments.evaluation.importance import evaluate
from vae_priors.experiments.registry import Pair
from vae_priors.experiments.training.svi import fit

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> dict:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    (code,) = [b for b in blocks if "class LaplacePriorVAE" in b]
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 -- our own documentation
    return namespace


def test_readme_pair_trains_evaluates_and_is_diagnosed(digits300):
    example = readme_example()
    pair = Pair(example["LaplacePriorVAE"](digits300.x_dim, 3), example["Encoder"](digits300.x_dim, 3))
    result = fit(pair, digits300, SVIConfig(epochs=3, batch_size=50), seed=0, progress=False)
    assert result.history.val_elbo.iloc[-1] > result.history.val_elbo.iloc[0]
    summary = evaluate(pair, digits300.test, num_particles=50).summary()
    assert math.isfinite(summary["test_log_lik"]) and summary["test_log_lik"] >= summary["test_elbo"]
    points = point_diagnostics(pair, digits300.test, num_particles=50)
    assert points.khat.shape == (len(digits300.test),) and np.isfinite(points.log_lik_psis).all()
    assert (points.kl >= 0).all() and np.isfinite(points.kl).all()


def _api_blocks() -> list[str]:
    section = README.read_text().split("## Python API", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_api_blocks_train_diagnose_generate_and_load_a_run(tmp_path):
    import subprocess
    import sys

    train, diagnose, load = _api_blocks()
    namespace: dict = {}
    exec(compile(train, str(README), "exec"), namespace)  # noqa: S102 -- our own documentation
    assert len(namespace["result"].history) <= 20 and namespace["result"].best_epoch >= 1
    exec(compile(diagnose, str(README), "exec"), namespace)  # noqa: S102
    assert namespace["points"].khat.shape == (100,)
    assert set(namespace["images"]) == {"prior", "q_agg", "gmm"}
    assert namespace["images"]["q_agg"].mean.shape == (16, namespace["dataset"].x_dim)
    assert namespace["decoded"].mean.shape == (4, namespace["dataset"].x_dim)
    run = subprocess.run([sys.executable, "-m", "vae_priors.experiments.cli", "run", "--variants", "vae", "--epochs",
                          "2", "--particles", "10", "--no-diagnose", "--quiet", "--out", "run"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    loaded = {"run_dir": str(tmp_path / "run")}
    exec(compile(load, str(README), "exec"), loaded)  # noqa: S102
    assert loaded["pair"].model.training is False and loaded["dataset"].name == "digits"
