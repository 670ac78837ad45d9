"""Tests of experiments.data.formats on small IDX, .amat and .npz files written here, and on the files in shared/."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from vae_priors.experiments.config import DataConfig
from vae_priors.experiments.data.datasets import validate
from vae_priors.experiments.data.formats import (
    BINARIZED_AMAT,
    BINARIZED_NPZ,
    IDX_FILES,
    IDX_IMAGES_MAGIC,
    IDX_LABELS_MAGIC,
    load_binarized_mnist,
    load_idx_directory,
    load_named,
    read_amat,
)

SHARED = Path(os.environ.get("VAE_PRIORS_SHARED", Path(__file__).resolve().parents[2] / "shared"))


# ------------------------------------------------------------------------------------------- file writers

def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    """The IDX encoding of a uint8 array: big-endian magic, one big-endian uint32 per dimension, the values."""
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray, magic: int, compress: bool = True) -> None:
    raw = idx_bytes(array, magic)
    path.write_bytes(gzip.compress(raw) if compress else raw)


def write_mnist(directory: Path, n_train: int = 12, n_test: int = 5, shape=(3, 4), seed: int = 0,
                compress: bool = True) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {"train_images": rng.integers(0, 256, (n_train, *shape)), "train_labels": rng.integers(0, 10, n_train),
              "test_images": rng.integers(0, 256, (n_test, *shape)), "test_labels": rng.integers(0, 10, n_test)}
    for key, array in arrays.items():
        name = IDX_FILES[key] if compress else IDX_FILES[key].removesuffix(".gz")
        write_idx(directory / name, array, IDX_IMAGES_MAGIC if key.endswith("images") else IDX_LABELS_MAGIC, compress)
    return arrays


def write_amat(path: Path, array: np.ndarray) -> None:
    path.write_text("".join(" ".join(str(int(v)) for v in row) + "\n" for row in array))


def binary_splits(sizes: tuple[int, int, int] = (5, 3, 2), seed: int = 0) -> dict[str, np.ndarray]:
    """Random 0/1 images under the array names of binarized_mnist.npz."""
    rng = np.random.default_rng(seed)
    names = ("train", "valid", "test")
    return {name: rng.integers(0, 2, (n, 784)).astype(np.uint8) for name, n in zip(names, sizes, strict=True)}


def write_binarized(directory: Path, arrays: dict[str, np.ndarray], fmt: str) -> None:
    if fmt == "npz":
        np.savez(directory / BINARIZED_NPZ, **arrays)
    else:
        for split, name in zip(("train", "val", "test"), ("train", "valid", "test"), strict=True):
            write_amat(directory / BINARIZED_AMAT[split], arrays[name])


# ------------------------------------------------------------------------------------------- IDX round trip

@pytest.mark.parametrize("compress", [True, False])
def test_idx_loader_round_trips_pixels_labels_and_the_fixed_last_val_split(tmp_path, compress):
    arrays = write_mnist(tmp_path, compress=compress)
    data = load_idx_directory(tmp_path, "mnist", val_size=4)
    flat = lambda a: torch.tensor(a.reshape(len(a), -1) / 255.0, dtype=torch.float32)  # noqa: E731
    assert data.image_shape == (3, 4) and data.x_dim == 12 and not data.conditional
    assert torch.equal(data.train.x, flat(arrays["train_images"][:8]))
    assert torch.equal(data.val.x, flat(arrays["train_images"][8:]))
    assert torch.equal(data.test.x, flat(arrays["test_images"]))
    assert data.train.labels.tolist() == arrays["train_labels"][:8].tolist()
    assert data.val.labels.tolist() == arrays["train_labels"][8:].tolist()
    assert data.test.labels.tolist() == arrays["test_labels"].tolist()
    assert validate(data, "bernoulli") is data


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_load_named_reads_idx_data_sets_from_the_configured_path(tmp_path, name):
    arrays = write_mnist(tmp_path, n_train=10_003, shape=(2, 2))
    data = load_named(DataConfig(name=name, path=str(tmp_path)))
    assert data.name == name
    assert (len(data.train), len(data.val), len(data.test)) == (3, 10_000, 5)
    assert data.val.labels.tolist() == arrays["train_labels"][3:].tolist()


# ---------------------------------------------------------------------------------------------- IDX errors

def test_missing_idx_file_is_named_with_the_expected_set(tmp_path):
    write_mnist(tmp_path)
    (tmp_path / IDX_FILES["test_labels"]).unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte.gz not found; the directory needs the four"):
        load_idx_directory(tmp_path, val_size=4)


def test_truncated_idx_payload_reports_promised_and_held_bytes(tmp_path):
    write_mnist(tmp_path)
    path = tmp_path / IDX_FILES["train_images"]
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-7]))
    with pytest.raises(ValueError, match=r"truncated: its header promises 12 x 3 x 4 = 144 bytes .* holds 137"):
        load_idx_directory(tmp_path, val_size=4)


def test_truncated_idx_header_is_reported(tmp_path):
    write_mnist(tmp_path)
    (tmp_path / IDX_FILES["train_labels"]).write_bytes(gzip.compress(IDX_LABELS_MAGIC.to_bytes(4, "big") + b"\0\0"))
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte.gz is truncated inside its header \(6 of 8"):
        load_idx_directory(tmp_path, val_size=4)


def test_truncated_gzip_stream_is_reported(tmp_path):
    write_mnist(tmp_path)
    path = tmp_path / IDX_FILES["test_images"]
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz: the gzip stream ends early"):
        load_idx_directory(tmp_path, val_size=4)


def test_uncompressed_bytes_under_a_gz_name_are_reported(tmp_path):
    write_mnist(tmp_path)
    path = tmp_path / IDX_FILES["test_images"]
    path.write_bytes(gzip.decompress(path.read_bytes()))
    with pytest.raises(ValueError, match="is not a valid gzip file .*drop the .gz"):
        load_idx_directory(tmp_path, val_size=4)


def test_wrong_magic_number_is_reported(tmp_path):
    arrays = write_mnist(tmp_path)
    # A labels file where the images should be: the classic swapped-files mistake.
    write_idx(tmp_path / IDX_FILES["train_images"], arrays["train_labels"], IDX_LABELS_MAGIC)
    with pytest.raises(ValueError, match="has magic number 2049 but an IDX images file starts with 2051"):
        load_idx_directory(tmp_path, val_size=4)


def test_extra_bytes_after_the_promised_payload_are_reported(tmp_path):
    write_mnist(tmp_path)
    path = tmp_path / IDX_FILES["test_labels"]
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes()) + b"\0"))
    with pytest.raises(ValueError, match="holds 6 bytes of labels but its header promises 5 = 5"):
        load_idx_directory(tmp_path, val_size=4)


def test_image_and_label_counts_must_match(tmp_path):
    write_mnist(tmp_path)
    write_idx(tmp_path / IDX_FILES["train_labels"], np.zeros(11), IDX_LABELS_MAGIC)
    with pytest.raises(ValueError, match="holds 12 images but .*train-labels-idx1-ubyte.gz holds 11 labels"):
        load_idx_directory(tmp_path, val_size=4)


def test_train_and_test_image_shapes_must_match(tmp_path):
    write_mnist(tmp_path)
    write_idx(tmp_path / IDX_FILES["test_images"], np.zeros((5, 4, 3)), IDX_IMAGES_MAGIC)
    with pytest.raises(ValueError, match=r"training images are \(3, 4\) but test images are \(4, 3\)"):
        load_idx_directory(tmp_path, val_size=4)


def test_holding_out_all_training_images_is_an_empty_split_error(tmp_path):
    write_mnist(tmp_path)  # 12 training images, fewer than the standard 10000 held out for validation
    with pytest.raises(ValueError, match="holds 12 images; holding out the last 10000 .* empty split"):
        load_named(DataConfig(name="mnist", path=str(tmp_path)))


def test_empty_test_file_loads_and_validate_names_the_empty_split(tmp_path):
    write_mnist(tmp_path, n_test=0)
    data = load_idx_directory(tmp_path, "fashion-mnist", val_size=4)
    with pytest.raises(ValueError, match="fashion-mnist test split x is empty"):
        validate(data, "bernoulli")


# ----------------------------------------------------------------------------- binarized MNIST round trip

@pytest.mark.parametrize("fmt", ["amat", "npz"])
def test_binarized_loader_round_trips_each_format(tmp_path, fmt):
    arrays = binary_splits()
    write_binarized(tmp_path, arrays, fmt)
    data = load_named(DataConfig(name="binarized-mnist", path=str(tmp_path)))
    assert data.name == "binarized-mnist" and data.image_shape == (28, 28)
    for split, name in zip(data.splits().values(), ("train", "valid", "test"), strict=True):
        assert torch.equal(split.x, torch.tensor(arrays[name], dtype=torch.float32))
        assert split.labels is None and split.y is None
    assert validate(data, "bernoulli") is data


def test_amat_files_take_precedence_over_the_npz(tmp_path):
    write_binarized(tmp_path, binary_splits(seed=1), "npz")
    amat = binary_splits(seed=2)
    write_binarized(tmp_path, amat, "amat")
    assert torch.equal(load_binarized_mnist(tmp_path).test.x, torch.tensor(amat["test"], dtype=torch.float32))


def test_npz_is_used_when_the_amat_set_is_incomplete(tmp_path):
    npz = binary_splits(seed=1)
    write_binarized(tmp_path, npz, "npz")
    write_amat(tmp_path / BINARIZED_AMAT["train"], binary_splits(seed=2)["train"])
    assert torch.equal(load_binarized_mnist(tmp_path).train.x, torch.tensor(npz["train"], dtype=torch.float32))


def test_amat_files_in_matlab_format_are_read(tmp_path):
    from scipy.io import savemat

    array = binary_splits()["train"]
    path = tmp_path / "binarized_mnist_train.amat"
    with path.open("wb") as stream:
        savemat(stream, {"X": array})
    assert np.array_equal(read_amat(path), array)


def test_npz_with_images_as_28x28_arrays_is_flattened(tmp_path):
    arrays = {k: v.reshape(len(v), 28, 28) for k, v in binary_splits().items()}
    write_binarized(tmp_path, arrays, "npz")
    assert load_binarized_mnist(tmp_path).val.x.shape == (3, 784)


# --------------------------------------------------------------------------------- binarized MNIST errors

def test_amat_row_of_the_wrong_width_names_the_line(tmp_path):
    arrays = binary_splits()
    write_binarized(tmp_path, arrays, "amat")
    path = tmp_path / BINARIZED_AMAT["val"]
    lines = path.read_text().splitlines()
    lines[1] = lines[1].rsplit(" ", 1)[0]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="_valid.amat line 2 has 783 values but every line must hold 784"):
        load_binarized_mnist(tmp_path)


def test_amat_entry_that_is_not_a_number_names_the_line(tmp_path):
    write_binarized(tmp_path, binary_splits(), "amat")
    path = tmp_path / BINARIZED_AMAT["test"]
    path.write_text(path.read_text().replace("1", "x", 1))
    with pytest.raises(ValueError, match="binarized_mnist_test.amat line 1 has an entry that is not a number"):
        load_binarized_mnist(tmp_path)


def test_empty_amat_file_is_reported(tmp_path):
    write_binarized(tmp_path, binary_splits(), "amat")
    (tmp_path / BINARIZED_AMAT["test"]).write_text("\n")
    with pytest.raises(ValueError, match="binarized_mnist_test.amat holds no images"):
        load_binarized_mnist(tmp_path)


def test_npz_missing_a_split_lists_what_it_has(tmp_path):
    arrays = binary_splits()
    del arrays["valid"]
    np.savez(tmp_path / BINARIZED_NPZ, **arrays)
    with pytest.raises(ValueError, match=r"has arrays \['test', 'train'\] but lacks \['valid'\]"):
        load_binarized_mnist(tmp_path)


def test_npz_array_of_the_wrong_shape_is_reported(tmp_path):
    arrays = binary_splits()
    arrays["test"] = arrays["test"][:, :700]
    write_binarized(tmp_path, arrays, "npz")
    with pytest.raises(ValueError, match=r"array 'test' has shape \(2, 700\); binarized MNIST needs \(num_images, 784"):
        load_binarized_mnist(tmp_path)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_npz_with_nan_or_inf_is_reported(tmp_path, bad):
    arrays = {k: v.astype(np.float32) for k, v in binary_splits().items()}
    arrays["train"][3, 100] = bad
    write_binarized(tmp_path, arrays, "npz")
    with pytest.raises(ValueError, match="array 'train' has NaN or inf values in 1 images"):
        load_binarized_mnist(tmp_path)


def test_grey_values_are_not_accepted_as_binarized_mnist(tmp_path):
    arrays = binary_splits()
    arrays["valid"] = arrays["valid"] * 255
    write_binarized(tmp_path, arrays, "amat")
    with pytest.raises(ValueError, match=r"values in \[0, 255\] other than 0 and 1.*data.name = \"mnist\""):
        load_binarized_mnist(tmp_path)


def test_missing_binarized_files_name_both_options(tmp_path):
    write_amat(tmp_path / BINARIZED_AMAT["train"], binary_splits()["train"])
    with pytest.raises(FileNotFoundError, match="neither binarized_mnist.npz nor .*missing: "
                                                "binarized_mnist_valid.amat, binarized_mnist_test.amat"):
        load_binarized_mnist(tmp_path)


def test_empty_binarized_split_loads_and_validate_names_it(tmp_path):
    write_binarized(tmp_path, binary_splits(sizes=(5, 0, 2)), "npz")
    with pytest.raises(ValueError, match="binarized-mnist val split x is empty"):
        validate(load_binarized_mnist(tmp_path), "bernoulli")


# ---------------------------------------------------------------------------------------------- dispatch

def test_load_named_with_an_empty_path_names_the_expected_files():
    with pytest.raises(ValueError, match="data.path is empty; set data.path to the directory holding "
                                         "train-images-idx3-ubyte.gz"):
        load_named(DataConfig(name="mnist"))


def test_load_named_with_a_missing_directory_names_the_expected_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory; it should hold binarized_mnist.npz or"):
        load_named(DataConfig(name="binarized-mnist", path=str(tmp_path / "nowhere")))


def test_load_named_rejects_an_unknown_name_listing_the_known_ones():
    with pytest.raises(ValueError, match="unknown data set data.name = 'cifar'; known: digits, mnist, fashion-mnist, "
                                         "binarized-mnist"):
        load_named(DataConfig(name="cifar", path="."))


# ------------------------------------------------------------------------------------- the real files

def test_real_mnist_has_the_standard_sizes_and_test_label_histogram():
    directory = SHARED / "data" / "mnist"
    if not directory.is_dir():
        pytest.skip(f"real MNIST files not found in {directory} (set VAE_PRIORS_SHARED)")
    data = load_named(DataConfig(name="mnist", path=str(directory)))
    assert [tuple(s.x.shape) for s in data.splits().values()] == [(50000, 784), (10000, 784), (10000, 784)]
    assert data.image_shape == (28, 28)
    assert torch.bincount(data.test.labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    train_and_val = torch.cat([data.train.labels, data.val.labels])
    assert torch.bincount(train_and_val).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert data.train.x.min() == 0 and data.train.x.max() == 1
    validate(data, "bernoulli")


def test_real_binarized_mnist_npz_has_the_standard_sizes_and_binary_values():
    directory = SHARED / "data" / "binarized_mnist"
    if not (directory / BINARIZED_NPZ).is_file():
        pytest.skip(f"real {BINARIZED_NPZ} not found in {directory} (set VAE_PRIORS_SHARED)")
    data = load_named(DataConfig(name="binarized-mnist", path=str(directory)))
    assert [tuple(s.x.shape) for s in data.splits().values()] == [(50000, 784), (10000, 784), (10000, 784)]
    for split in data.splits().values():
        assert ((split.x == 0) | (split.x == 1)).all() and 0 < split.x.mean() < 1
    # Mean pixel of the published training split (shared/data/README.md): 0.13056.
    assert abs(data.train.x.mean().item() - 0.13056) < 5e-5
    validate(data, "bernoulli")
