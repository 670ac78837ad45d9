"""Data sets as tensors: the embedded digits, the quadrant-completion task, and the checks every split passes.

A ``Dataset`` holds three ``Split``s (train / val / test). Unconditional pairs read ``x``; conditional
pairs read ``x`` (the input) and ``y`` (what to predict). File formats (MNIST IDX, binarized-MNIST
``.amat``/``.npz``) are read by ``vae_priors.experiments.data.formats``; synthetic data with known parameters by
``vae_priors.experiments.data.synthetic``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from vae_priors.models.likelihoods import check_support

DATA_SEED = 0  # fixes the split and the static binarization: part of the data set, not of a run


@dataclass(frozen=True)
class Split:
    """One split: inputs ``x`` (N, D), optional targets ``y`` (N, D_y) and class labels (N,)."""

    x: torch.Tensor
    y: torch.Tensor | None = None
    labels: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.x.shape[0]

    def tensors(self, index: torch.Tensor | slice | None = None) -> tuple[torch.Tensor, ...]:
        """The arguments of a pair's model and guide for the points ``index``: ``(x,)`` or ``(x, y)``."""
        index = slice(None) if index is None else index
        return (self.x[index],) if self.y is None else (self.x[index], self.y[index])

    def _map(self, fn) -> Split:
        return Split(*(None if t is None else fn(t) for t in (self.x, self.y, self.labels)))

    def subset(self, index: torch.Tensor | slice) -> Split:
        """The points ``index`` of this split."""
        return self._map(lambda t: t[index])

    def to(self, device: torch.device | str) -> Split:
        return self._map(lambda t: t.to(device))


def as_split(points: Split | torch.Tensor | tuple[torch.Tensor, ...]) -> Split:
    """A ``Split`` from a split or from tensors: ``x`` (N, D), ``(x,)`` or ``(x, y)``."""
    if isinstance(points, Split):
        return points
    if torch.is_tensor(points):
        return Split(points)
    if isinstance(points, tuple) and 1 <= len(points) <= 2 and all(torch.is_tensor(t) for t in points):
        return Split(*points)
    raise TypeError(f"expected a Split, a tensor x or a tuple (x, y) of tensors, got {type(points).__name__}")


@dataclass(frozen=True)
class Dataset:
    """A named data set: three splits, the image shape of x (if x is an image), and how to binarize."""

    name: str
    train: Split
    val: Split
    test: Split
    image_shape: tuple[int, int] | None = None
    dynamic_binarization: bool = False  # resample binary training pixels from grey values every batch

    @property
    def x_dim(self) -> int:
        return self.train.x.shape[1]

    @property
    def y_dim(self) -> int:
        return 0 if self.train.y is None else self.train.y.shape[1]

    @property
    def conditional(self) -> bool:
        return self.train.y is not None

    def splits(self) -> dict[str, Split]:
        return {"train": self.train, "val": self.val, "test": self.test}

    def to(self, device: torch.device | str) -> Dataset:
        return replace(self, train=self.train.to(device), val=self.val.to(device), test=self.test.to(device))


def validate(data: Dataset, likelihood: str) -> Dataset:
    """Check every split: non-empty, 2-D, finite, same width, inside the likelihood's support."""
    for name, split in data.splits().items():
        for what, t in (("x", split.x), ("y", split.y)):
            if t is None:
                continue
            label = f"{data.name} {name} split {what}"
            if t.ndim != 2:
                raise ValueError(f"{label} has shape {tuple(t.shape)}; expected (num_points, num_features)")
            if t.shape[0] == 0:
                raise ValueError(f"{label} is empty; every split needs at least one point "
                                 "(check the files or the split sizes)")
            if not torch.isfinite(t).all():
                bad = int((~torch.isfinite(t)).any(dim=1).sum())
                raise ValueError(f"{label} has NaN or inf values in {bad} rows; clean or drop those rows first")
            ref = getattr(data.train, what)
            if t.shape[1] != ref.shape[1]:
                raise ValueError(f"{label} has {t.shape[1]} features but train has {ref.shape[1]}")
        check_support(likelihood, split.y if split.y is not None else split.x, f"{data.name} {name} split")
    return data


def _check_probabilities(x: torch.Tensor) -> None:
    if x.numel() and not (x.min() >= 0 and x.max() <= 1):  # written so that NaN fails too
        raise ValueError(f"binarization draws Bernoulli(x) and needs x in [0, 1], but x has values in "
                         f"[{x.min().item():.4g}, {x.max().item():.4g}]; set data.binarize = \"none\" for such data")


def binarize_static(x: torch.Tensor, seed: int = DATA_SEED) -> torch.Tensor:
    """One fixed draw x_bin ~ Bernoulli(x) (Larochelle & Murray's static binarization of grey pixels)."""
    _check_probabilities(x)
    generator = torch.Generator().manual_seed(seed)
    return torch.bernoulli(x, generator=generator)


def split_indices(n: int, val: int, test: int, seed: int = DATA_SEED) -> tuple[np.ndarray, ...]:
    """A fixed random partition of ``range(n)`` into train / val / test index arrays."""
    perm = np.random.default_rng(seed).permutation(n)
    return perm[val + test :], perm[:val], perm[val : val + test]


def from_arrays(name: str, x: np.ndarray, labels: np.ndarray | None, *, val: int, test: int,
                image_shape: tuple[int, int] | None) -> Dataset:
    """Split one array of points (N, D) into a ``Dataset`` with fixed random train / val / test splits."""
    parts = split_indices(len(x), val, test)
    xt = torch.as_tensor(np.asarray(x, dtype=np.float32))
    lt = None if labels is None else torch.as_tensor(np.asarray(labels, dtype=np.int64))
    splits = [Split(xt[i], None, None if lt is None else lt[i]) for i in parts]
    return Dataset(name, *splits, image_shape=image_shape)


def load_digits() -> Dataset:
    """scikit-learn's bundled 8x8 digits (1797 images), pixels scaled to [0, 1]; 1257 / 180 / 360 split."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    return from_arrays("digits", bunch.data / 16.0, bunch.target, val=180, test=360, image_shape=(8, 8))


def binarize(data: Dataset, mode: str) -> Dataset:
    """``"none"``: keep grey values; ``"static"``: one fixed Bernoulli draw per split (seeded);
    ``"dynamic"``: val/test static, training pixels redrawn from the grey values every batch."""
    if mode not in ("none", "static", "dynamic"):
        raise ValueError(f"unknown binarization {mode!r}; choose none, static or dynamic")
    if mode == "none":
        return data
    b = lambda s, k: replace(s, x=binarize_static(s.x, DATA_SEED + k))  # noqa: E731
    if mode == "dynamic":  # fit() redraws the training batches, so check them now rather than mid-training
        _check_probabilities(data.train.x)
    train = data.train if mode == "dynamic" else b(data.train, 0)
    return replace(data, train=train, val=b(data.val, 1), test=b(data.test, 2), dynamic_binarization=mode == "dynamic")


# The order in which quadrants become visible, as in Pyro's CVAE example (examples/cvae/mnist.py, after Sohn et al.
# 2015): 1 visible = bottom-left, 2 = the left half, 3 = all but the bottom-right. The first `visible` are the input x,
# the rest the target y (both keep the image's row-major pixel order).
QUADRANTS = ("bottom-left", "top-left", "top-right", "bottom-right")


def quadrant_masks(image_shape: tuple[int, int], visible: int) -> torch.Tensor:
    """Boolean mask over flattened pixels: True where the pixel is in one of the first ``visible`` quadrants."""
    h, w = image_shape
    if h % 2 or w % 2:
        raise ValueError(f"the quadrant task needs even image sides, got {h}x{w}")
    if visible not in (1, 2, 3):
        raise ValueError(f"visible quadrants must be 1, 2 or 3 (as in Sohn et al. 2015), got {visible}")
    bottom, right = torch.arange(h)[:, None] >= h // 2, torch.arange(w)[None, :] >= w // 2
    rank = torch.where(bottom, torch.where(right, 3, 0), torch.where(right, 2, 1))  # position in QUADRANTS
    return (rank < visible).flatten()


def quadrant_task(data: Dataset, visible: int = 1) -> Dataset:
    """Sohn et al.'s quadrant completion: x = the ``visible`` quadrant(s), y = the rest of the image."""
    if data.image_shape is None:
        raise ValueError(f"the quadrant task needs image data; {data.name} has no image shape")
    mask = quadrant_masks(data.image_shape, visible)
    cut = lambda s: Split(s.x[:, mask], s.x[:, ~mask], s.labels)  # noqa: E731
    return replace(data, name=f"{data.name}-quadrants{visible}", train=cut(data.train), val=cut(data.val),
                   test=cut(data.test))
