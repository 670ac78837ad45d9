"""Data sets read from files in a directory (``data.path``); nothing is ever downloaded.

* MNIST and Fashion-MNIST (LeCun et al. 1998; Xiao et al. 2017): the four IDX files under their standard names
  (``train-images-idx3-ubyte.gz`` ...), gzip-compressed or already decompressed (the same name without ``.gz``).
  Pixels / 255 lie in [0, 1]. Split: the first ``N - 10000`` training images are train, the last 10000 are
  validation -- the fixed rule of the classic ``mnist.pkl.gz`` (50000 / 10000), not a random split -- and the
  ``t10k`` files are the test set.
* Statically binarized MNIST (Larochelle & Murray, AISTATS 2011): 50000 / 10000 / 10000 images in {0, 1}, no
  labels. Either the original text files ``binarized_mnist_{train,valid,test}.amat`` (one image per line, 784
  whitespace-separated values) or ``binarized_mnist.npz`` with arrays ``train`` / ``valid`` / ``test``. When a
  directory holds all three ``.amat`` files they are read (they are the published original); otherwise the
  ``.npz``. ``.amat`` files that are really MATLAB v5 files (as some copies are) are read with scipy.

``load_named(cfg)`` dispatches on ``cfg.name`` through ``LOADERS``. Every problem with a file -- missing,
truncated, wrong magic number, wrong shape, NaN/inf, values that are not what the format promises -- is a
``FileNotFoundError`` or ``ValueError`` whose message names the file, the problem and the fix.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from vae_priors.experiments.config import DataConfig
from vae_priors.experiments.data.arrays import load_npz_arrays, read_npz
from vae_priors.experiments.data.datasets import Dataset, Split
from vae_priors.experiments.data.synthetic import load_linear_gaussian

IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions (count, rows, cols)
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension (count)
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
MNIST_VAL_SIZE = 10_000

BINARIZED_SPLITS = {"train": "train", "val": "valid", "test": "test"}  # our split name -> the file's
BINARIZED_AMAT = {split: f"binarized_mnist_{name}.amat" for split, name in BINARIZED_SPLITS.items()}
BINARIZED_NPZ = "binarized_mnist.npz"
BINARIZED_IMAGE_SHAPE = (28, 28)


# ---------------------------------------------------------------------------------------------- IDX (MNIST)

def _read_maybe_gzip(path: Path) -> bytes:
    """The bytes of ``path``, decompressed if its name ends in ``.gz``."""
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as stream:
            return stream.read()
    except EOFError:
        raise ValueError(f"{path}: the gzip stream ends early, so the file is truncated (an interrupted download?); "
                         "copy or download the file again") from None
    except (gzip.BadGzipFile, zlib.error) as err:
        raise ValueError(f"{path} is not a valid gzip file ({err}); if it is already decompressed, drop the .gz "
                         "from its name, otherwise copy or download it again") from None


def _find_idx(directory: Path, name: str) -> Path:
    """``directory/name`` (gzip) or, if only that exists, the decompressed ``directory/name`` without ``.gz``."""
    for path in (directory / name, directory / name.removesuffix(".gz")):
        if path.is_file():
            return path
    raise FileNotFoundError(f"{directory / name} not found; the directory needs the four IDX files "
                            f"{', '.join(IDX_FILES.values())} (standard names; nothing is downloaded)")


def read_idx(path: str | Path, magic: int) -> np.ndarray:
    """Parse one IDX file into a uint8 array of the shape its header gives.

    Header: a big-endian uint32 magic number (``IDX_IMAGES_MAGIC`` or ``IDX_LABELS_MAGIC``; its low byte is
    the number of dimensions), then one big-endian uint32 per dimension; then the values, row-major.
    """
    path = Path(path)
    raw = _read_maybe_gzip(path)
    kind = "images" if magic == IDX_IMAGES_MAGIC else "labels"
    if len(raw) < 4:
        raise ValueError(f"{path} is truncated: {len(raw)} bytes, fewer than the 4-byte IDX magic number; "
                         "copy or download the file again")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise ValueError(f"{path} has magic number {found} but an IDX {kind} file starts with {magic}; it is not "
                         f"an MNIST-style {kind} file (images and labels swapped, or a different format?)")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path} is truncated inside its header ({len(raw)} of {header} bytes); "
                         "copy or download the file again")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    promised, held = int(np.prod(dims)), len(raw) - header
    shape = " x ".join(map(str, dims))
    if held < promised:
        raise ValueError(f"{path} is truncated: its header promises {shape} = {promised} bytes of {kind} but the "
                         f"file holds {held}; copy or download the file again")
    if held > promised:
        raise ValueError(f"{path} holds {held} bytes of {kind} but its header promises {shape} = {promised}; "
                         "the file is corrupted or not an IDX file -- copy or download it again")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _read_idx_pair(directory: Path, part: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, rows, cols) and labels (N,) of ``part`` ("train" or "test"), checked against each other."""
    image_path = _find_idx(directory, IDX_FILES[f"{part}_images"])
    label_path = _find_idx(directory, IDX_FILES[f"{part}_labels"])
    images, labels = read_idx(image_path, IDX_IMAGES_MAGIC), read_idx(label_path, IDX_LABELS_MAGIC)
    if len(images) != len(labels):
        raise ValueError(f"{image_path} holds {len(images)} images but {label_path} holds {len(labels)} labels; "
                         "the two files must come from the same release -- replace the mismatched one")
    return images, labels


def load_idx_directory(directory: str | Path, name: str = "mnist", val_size: int = MNIST_VAL_SIZE) -> Dataset:
    """MNIST or Fashion-MNIST from the four IDX files in ``directory``; pixels / 255 in [0, 1].

    Train = the first ``N - val_size`` training images, val = the last ``val_size`` (fixed, not random),
    test = the ``t10k`` files. Labels are kept (int64). ``image_shape`` comes from the IDX header.
    """
    directory = Path(directory)
    train_images, train_labels = _read_idx_pair(directory, "train")
    test_images, test_labels = _read_idx_pair(directory, "test")
    if train_images.shape[1:] != test_images.shape[1:]:
        raise ValueError(f"{directory}: training images are {train_images.shape[1:]} but test images are "
                         f"{test_images.shape[1:]}; the four files must come from the same data set")
    if not 0 < val_size < len(train_images):
        raise ValueError(f"{directory / IDX_FILES['train_images']} holds {len(train_images)} images; holding out "
                         f"the last {val_size} for validation would leave an empty split -- use the full file "
                         "(60000 images) or a smaller val_size")
    pixels = int(np.prod(train_images.shape[1:]))
    to_x = lambda a: torch.from_numpy(a.reshape(len(a), pixels).astype(np.float32) / 255.0)  # noqa: E731
    to_labels = lambda a: torch.from_numpy(a.astype(np.int64))  # noqa: E731
    cut = len(train_images) - val_size
    return Dataset(
        name,
        train=Split(to_x(train_images[:cut]), None, to_labels(train_labels[:cut])),
        val=Split(to_x(train_images[cut:]), None, to_labels(train_labels[cut:])),
        test=Split(to_x(test_images), None, to_labels(test_labels)),
        image_shape=tuple(int(d) for d in train_images.shape[1:]),
    )


# ------------------------------------------------------------------------------ statically binarized MNIST

def read_amat(path: str | Path, width: int = 784) -> np.ndarray:
    """One ``.amat`` split as a float32 array (N, ``width``): text with one image per line, or MATLAB v5."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    with path.open("rb") as stream:
        if stream.read(6) == b"MATLAB":
            return _read_mat(path)
    try:
        return _read_amat_text(path, width)
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text (byte {err.start} cannot be decoded) nor a MATLAB file; the "
                         f"file is damaged or not binarized MNIST -- copy or download it again") from None


def _read_amat_text(path: Path, width: int) -> np.ndarray:
    rows = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                values = np.array(line.split(), dtype=np.float32)
            except ValueError:
                raise ValueError(f"{path} line {number} has an entry that is not a number; every line must hold "
                                 f"{width} whitespace-separated 0/1 values") from None
            if values.shape[0] != width:
                raise ValueError(f"{path} line {number} has {values.shape[0]} values but every line must hold {width} "
                                 "(one 28x28 image); the file is truncated or not binarized MNIST")
            rows.append(values)
    if not rows:
        raise ValueError(f"{path} holds no images; expected one line of {width} 0/1 values per image")
    return np.stack(rows)


def _read_mat(path: Path) -> np.ndarray:
    """The single array of a MATLAB v5 file (copies of the ``.amat`` files that hold a matrix ``X``)."""
    from scipy.io import loadmat  # only for this rarely seen variant; scipy comes with scikit-learn

    try:
        contents = loadmat(path)
    except Exception as err:  # scipy raises MatReadError, ValueError, TypeError ... for a damaged file
        raise ValueError(f"{path} starts like a MATLAB file but cannot be read ({type(err).__name__}: {err}); it is "
                         "truncated or damaged -- copy or download it again") from None
    arrays = {k: v for k, v in contents.items() if not k.startswith("__")}
    if len(arrays) != 1:
        raise ValueError(f"{path} is a MATLAB file with arrays {sorted(arrays)}; expected exactly one (N, 784) "
                         "array -- convert it to the text .amat format or to binarized_mnist.npz")
    return np.asarray(next(iter(arrays.values())), dtype=np.float32)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """The three arrays of ``binarized_mnist.npz``, by split; a damaged file or a missing array is a ``ValueError``."""
    names = list(BINARIZED_SPLITS.values())
    arrays = read_npz(path, names, f"binarized MNIST is an .npz written by numpy.savez with arrays {names}")
    return {split: arrays[name] for split, name in BINARIZED_SPLITS.items()}


def _check_binary(array: np.ndarray, where: str) -> np.ndarray:
    """``array`` as float32 (N, 784) with values in {0, 1}; anything else is a clear error."""
    width = int(np.prod(BINARIZED_IMAGE_SHAPE))
    if array.ndim == 3 and array.shape[1:] == BINARIZED_IMAGE_SHAPE:
        array = array.reshape(len(array), width)
    if array.ndim != 2 or array.shape[1] != width:
        raise ValueError(f"{where} has shape {array.shape}; binarized MNIST needs (num_images, {width})")
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).any(axis=1).sum())
        raise ValueError(f"{where} has NaN or inf values in {bad} images; replace the file with a clean copy")
    if not ((array == 0) | (array == 1)).all():
        raise ValueError(f"{where} has values in [{array.min():g}, {array.max():g}] other than 0 and 1, so it is not "
                         "statically binarized; for grey MNIST use data.name = \"mnist\" with the IDX files")
    return array.astype(np.float32, copy=False)


def load_binarized_mnist(directory: str | Path) -> Dataset:
    """Larochelle & Murray's statically binarized MNIST from ``directory`` (50000 / 10000 / 10000, no labels).

    Reads the three ``.amat`` files when all are present (the original distribution), else ``binarized_mnist.npz``.
    """
    directory = Path(directory)
    amat = {split: directory / name for split, name in BINARIZED_AMAT.items()}
    npz = directory / BINARIZED_NPZ
    if all(path.is_file() for path in amat.values()):
        arrays = {split: _check_binary(read_amat(path), str(path)) for split, path in amat.items()}
    elif npz.is_file():
        arrays = {split: _check_binary(a, f"{npz} array {BINARIZED_SPLITS[split]!r}")
                  for split, a in _read_npz(npz).items()}
    else:
        missing = [path.name for path in amat.values() if not path.is_file()]
        raise FileNotFoundError(f"{directory} holds neither {BINARIZED_NPZ} nor all three .amat files (missing: "
                                f"{', '.join(missing)}); put either there (nothing is downloaded)")
    splits = {split: Split(torch.from_numpy(a)) for split, a in arrays.items()}
    return Dataset("binarized-mnist", **splits, image_shape=BINARIZED_IMAGE_SHAPE)


# ------------------------------------------------------------------------------------------------ dispatch

def _from_directory(load: Callable[[Path], Dataset], expected: str) -> Callable[[DataConfig], Dataset]:
    """Adapt a directory reader to a ``DataConfig``: ``cfg.path`` must name an existing directory."""

    def from_config(cfg: DataConfig) -> Dataset:
        if not cfg.path:
            raise ValueError(f"data.name = {cfg.name!r} is read from files but data.path is empty; set data.path "
                             f"to the directory holding {expected}")
        directory = Path(cfg.path).expanduser()
        if not directory.is_dir():
            raise FileNotFoundError(f"data.path = {cfg.path!r} is not a directory; it should hold {expected}")
        return load(directory)

    return from_config


_IDX_EXPECTED = ", ".join(IDX_FILES.values())
_BINARIZED_EXPECTED = f"{BINARIZED_NPZ} or {', '.join(BINARIZED_AMAT.values())}"

# Data set name -> loader taking the ``DataConfig``. Synthetic data sets that need no files are added here too,
# e.g. ``"linear-gaussian": <a function of DataConfig in experiments.synthetic>``.
LOADERS: dict[str, Callable[[DataConfig], Dataset]] = {
    "mnist": _from_directory(lambda d: load_idx_directory(d, "mnist"), _IDX_EXPECTED),
    "fashion-mnist": _from_directory(lambda d: load_idx_directory(d, "fashion-mnist"), _IDX_EXPECTED),
    "binarized-mnist": _from_directory(load_binarized_mnist, _BINARIZED_EXPECTED),
    "linear-gaussian": load_linear_gaussian,
    "npz": load_npz_arrays,  # a user's own arrays (experiments/data/arrays.py)
}


def load_named(cfg: DataConfig) -> Dataset:
    """The data set ``cfg.name`` (before binarization); file-based ones are read from ``cfg.path``."""
    if cfg.name not in LOADERS:
        known = ", ".join(["digits", *LOADERS])
        raise ValueError(f"unknown data set data.name = {cfg.name!r}; known: {known}")
    return LOADERS[cfg.name](cfg)
