"""A user's own data set from arrays: one ``.npz`` file named by ``data.path`` with ``data.name = "npz"``.

The archive holds ``train``, ``valid`` and ``test``: (N, D) rows, or (N, H, W) images (then the quadrant task and
image grids work too), continuous or binary; optional ``train_labels`` / ``valid_labels`` / ``test_labels`` (N,)
integer class labels enable the sample scores. Which likelihood fits is the config's choice: binary or [0, 1]
values with ``likelihood = "bernoulli"``, anything finite with ``likelihood = "gaussian"`` and
``binarize = "none"``; ``datasets.validate`` refuses values outside the likelihood's support.
"""

from __future__ import annotations

import pickle
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from vae_priors.experiments.config import DataConfig
from vae_priors.experiments.data.datasets import Dataset, Split

SPLITS = {"train": "train", "val": "valid", "test": "test"}


def read_npz(path: Path, required: list[str], hint: str) -> dict[str, np.ndarray]:
    """Every array of the ``.npz`` at ``path``, which must hold ``required``; an empty, truncated or non-npz file,
    or a missing array, is one ``ValueError`` naming the file and ``hint`` (what the archive should hold)."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [name for name in required if name not in archive.files]
            if missing:
                raise ValueError(f"{path} has arrays {sorted(archive.files)} but lacks {missing}; {hint}")
            return {name: archive[name] for name in archive.files}
    except PermissionError:
        raise  # the CLI names the file and the fix
    except (EOFError, zipfile.BadZipFile, zlib.error, pickle.UnpicklingError, OSError) as err:
        state = "empty" if path.stat().st_size == 0 else f"truncated or not an .npz archive ({type(err).__name__})"
        raise ValueError(f"{path} is {state}; copy or download the file again ({hint})") from None
    except ValueError as err:
        if str(err).startswith(str(path)):
            raise  # our own message above
        raise ValueError(f"{path} is not a numpy .npz archive ({err}); copy or download the file again") from None


def _labels(arrays: dict[str, np.ndarray], name: str, rows: int, path: Path) -> torch.Tensor | None:
    key = f"{name}_labels"
    if key not in arrays:
        return None
    labels = np.asarray(arrays[key])
    if labels.shape != (rows,) or not np.issubdtype(labels.dtype, np.integer) or (labels < 0).any():
        raise ValueError(f"{path}: {key} must be {rows} non-negative integers (one class per row), got shape "
                         f"{labels.shape} and dtype {labels.dtype}")
    return torch.from_numpy(labels.astype(np.int64))


def load_npz_arrays(cfg: DataConfig) -> Dataset:
    """The ``.npz`` at ``cfg.path`` as a ``Dataset`` named after the file."""
    if not cfg.path:
        raise ValueError('data.name = "npz" reads your arrays from one .npz file, but data.path is empty; set '
                         "data.path to the file (arrays train, valid, test)")
    path = Path(cfg.path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"data.path = {cfg.path!r} is not a file; for data.name = \"npz\" it names an .npz "
                                "archive with arrays train, valid and test")
    archive = read_npz(path, list(SPLITS.values()), "save your data with numpy.savez(path, train=..., valid=..., "
                       "test=...)")
    arrays = {split: np.asarray(archive[name], dtype=np.float32) for split, name in SPLITS.items()}
    labels = {split: _labels(archive, name, len(arrays[split]), path) for split, name in SPLITS.items()}
    shapes = {a.shape[1:] for a in arrays.values()}
    if len(shapes) != 1 or any(a.ndim not in (2, 3) for a in arrays.values()):
        raise ValueError(f"{path}: train, valid and test must be (N, D) or (N, H, W) with the same trailing shape, "
                         f"got {[a.shape for a in arrays.values()]}")
    (shape,) = shapes
    image_shape = tuple(int(s) for s in shape) if len(shape) == 2 else None
    splits = {split: Split(torch.from_numpy(a.reshape(len(a), -1)), labels=labels[split])
              for split, a in arrays.items()}
    return Dataset(path.stem, **splits, image_shape=image_shape)
