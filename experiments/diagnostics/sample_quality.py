"""Scores for generated samples that need no external weights: a small classifier trained on the data set itself.

Per data set with class labels, one MLP classifier ``x -> FEATURE_DIM -> classes`` is trained on the training
split and cached on disk (keyed by a hash of the training data, so a different binarization gets its own).
Its penultimate layer (``FEATURE_DIM`` ReLU units) plays the role Inception features play in the FID
(Heusel et al. 2017). For a set of samples it reports:

* ``frechet``: the Frechet distance between Gaussians fitted to the features of the samples and of the test
  split, ||mu_1 - mu_2||^2 + tr(C_1 + C_2 - 2 (C_1^{1/2} C_2 C_1^{1/2})^{1/2}) (lower = closer to the data);
* ``max_prob``: the mean over samples of the classifier's largest class probability (how recognisable);
* ``coverage``: the share of the K classes that are the predicted class of at least 1 / (2K) of the samples,
  half the share a class gets under uniform coverage (1.0 = every class appears; mode dropping lowers it).

Data without labels (binarized MNIST) get no scores: ``load_or_train_classifier`` returns ``None`` and a reason.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from vae_priors.experiments.data.datasets import Split
from vae_priors.experiments.files import atomic_path, load_torch

FEATURE_DIM = 64
HIDDEN = 256


class FeatureClassifier(nn.Module):
    """x -> HIDDEN -> FEATURE_DIM (the features) -> class logits."""

    def __init__(self, x_dim: int, num_classes: int):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(x_dim, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, FEATURE_DIM), nn.ReLU())
        self.head = nn.Linear(FEATURE_DIM, num_classes)
        self.num_classes = num_classes

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def data_key(split: Split) -> str:
    """A short hash of the training inputs and labels: the cache key of a classifier."""
    digest = hashlib.sha256(split.x.detach().cpu().numpy().tobytes())
    digest.update(split.labels.detach().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def train_classifier(split: Split, epochs: int = 30, batch_size: int = 128, lr: float = 1e-3,
                     seed: int = 0) -> FeatureClassifier:
    """Cross-entropy training with Adam on ``split.x`` / ``split.labels``."""
    if split.labels is None:
        raise ValueError("the classifier needs class labels; this split has none")
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = FeatureClassifier(split.x.shape[1], int(split.labels.max()) + 1)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(epochs):
        for index in torch.randperm(len(split), generator=generator).split(batch_size):
            loss = F.cross_entropy(net(split.x[index]), split.labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return net.eval()


def load_or_train_classifier(split: Split, cache_dir: str | Path, name: str = "data",
                             seed: int = 0) -> tuple[FeatureClassifier | None, str]:
    """The cached classifier for the training ``split`` (trained and saved atomically on first use).

    Returns ``(classifier, note)``; ``(None, reason)`` when the split has no labels.
    """
    if split.labels is None:
        return None, f"{name} has no class labels, so generated samples are not scored (no classifier to train)"
    path = Path(cache_dir) / f"classifier-{name}-{data_key(split)}-seed{seed}.pt"
    if path.is_file():
        saved = load_torch(path, "cached sample-scoring classifier")
        net = FeatureClassifier(saved["x_dim"], saved["num_classes"])
        net.load_state_dict(saved["state"])
        return net.eval(), f"classifier loaded from {path}"
    net = train_classifier(split, seed=seed)
    with atomic_path(path) as tmp:
        torch.save({"x_dim": split.x.shape[1], "num_classes": net.num_classes, "state": net.state_dict()}, tmp)
    return net, f"classifier trained on {len(split)} {name} training points, cached at {path}"


def _sqrtm_psd(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """Squared 2-Wasserstein distance between N(mu1, cov1) and N(mu2, cov2) (Dowson & Landau 1982).

    tr (C_1^{1/2} C_2 C_1^{1/2})^{1/2} is the sum of square roots of the eigenvalues of that symmetric PSD
    matrix, which stays real and stable where ``scipy.linalg.sqrtm(C_1 C_2)`` can return complex noise.
    """
    root1 = _sqrtm_psd(np.asarray(cov1, dtype=np.float64))
    middle = root1 @ np.asarray(cov2, dtype=np.float64) @ root1
    cross = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
    diff = np.asarray(mu1, dtype=np.float64) - np.asarray(mu2, dtype=np.float64)
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * cross)


def _moments(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    f = features.detach().double().cpu().numpy()
    return f.mean(axis=0), np.cov(f, rowvar=False)


@dataclass
class SampleScores:
    frechet: float
    max_prob: float
    coverage: float
    frechet_se: float = float("nan")  # bootstrap over the generated samples (the reference split held fixed)
    max_prob_se: float = float("nan")  # standard error over samples


def class_coverage(predicted: torch.Tensor, num_classes: int) -> float:
    """Share of classes that are the predicted class of at least 1 / (2 * num_classes) of the samples."""
    share = torch.bincount(predicted, minlength=num_classes).double() / predicted.numel()
    return float((share >= 1.0 / (2 * num_classes)).double().mean())


@torch.no_grad()
def score_samples(classifier: FeatureClassifier, samples: torch.Tensor, reference: torch.Tensor,
                  bootstrap: int = 50, seed: int = 0) -> SampleScores:
    """Frechet distance to ``reference`` (the test split) in the classifier's features, mean max probability and
    class coverage of ``samples`` (num, x_dim).

    The FD's standard error is the spread of the FD over ``bootstrap`` resamples (with replacement) of the samples:
    it says how much the number would move with another set of draws from the same source, so "FD 1.9 vs 2.9" can
    be read. (FD is biased upward for few samples, and the bias also depends on the number of samples.)
    """
    probs = classifier(samples).softmax(dim=-1)
    features = classifier.features(samples).double().cpu().numpy()
    ref = _moments(classifier.features(reference))
    fd = frechet_distance(features.mean(0), np.cov(features, rowvar=False), *ref)
    rng = np.random.default_rng(seed)
    draws = [rng.integers(0, len(features), len(features)) for _ in range(bootstrap)]
    boot = [frechet_distance(features[i].mean(0), np.cov(features[i], rowvar=False), *ref) for i in draws]
    top = probs.max(dim=-1).values.double()
    return SampleScores(fd, float(top.mean()), class_coverage(probs.argmax(dim=-1), classifier.num_classes),
                        frechet_se=float(np.std(boot, ddof=1)) if bootstrap > 1 else float("nan"),
                        max_prob_se=float(top.std() / len(top) ** 0.5) if len(top) > 1 else float("nan"))
