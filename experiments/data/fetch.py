"""``vae-priors data fetch NAME DIR``: download a data set's files and check every byte before keeping them.

* ``mnist``: the four original IDX files, each checked against its published SHA-256 (the values that
  TensorFlow Datasets and others pin; MD5s match LeCun's).
* ``binarized-mnist``: Larochelle & Murray's three ``binarized_mnist_{train,valid,test}.amat`` text files. No
  file hash is published for them, so each is parsed and the SHA-256 of its (N, 784) uint8 array is checked
  against the arrays of the copy this project was developed on (two independent copies, mingzhang-yin/ARM-gradient
  and mad-ant/TheanoNADE, agree exactly). This machine had no access to the original server, so that the Toronto
  files parse to these arrays is expected, not verified: a mismatch is reported, never kept.

A file is downloaded to a hidden temporary name in DIR and renamed into place only after its check passes, so an
interrupted or corrupted download leaves nothing that a run would read. Files already present and correct are
not downloaded again. ``base_url`` replaces the default server (a mirror; the tests serve files from loopback).
"""

from __future__ import annotations

import hashlib
import shutil
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vae_priors.experiments.files import atomic_path


class FetchError(ValueError):
    """A download failed or its content is not the expected file."""


@dataclass(frozen=True)
class RemoteFile:
    name: str
    sha256: str  # of the file's bytes, or of its parsed array when ``array`` is set
    array: bool = False


MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
BINARIZED_URL = "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"
FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"  # zalandoresearch/fashion-mnist README

SOURCES: dict[str, tuple[str, tuple[RemoteFile, ...]]] = {
    "mnist": (MNIST_URL, (
        RemoteFile("train-images-idx3-ubyte.gz", "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
        RemoteFile("train-labels-idx1-ubyte.gz", "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
        RemoteFile("t10k-images-idx3-ubyte.gz", "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
        RemoteFile("t10k-labels-idx1-ubyte.gz", "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
    )),
    # the SHA-256 of the four files Zalando publishes (their README gives MD5s; these agree with them)
    "fashion-mnist": (FASHION_URL, (
        RemoteFile("train-images-idx3-ubyte.gz", "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"),
        RemoteFile("train-labels-idx1-ubyte.gz", "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845"),
        RemoteFile("t10k-images-idx3-ubyte.gz", "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073"),
        RemoteFile("t10k-labels-idx1-ubyte.gz", "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"),
    )),
    "binarized-mnist": (BINARIZED_URL, (
        RemoteFile("binarized_mnist_train.amat", "43490d4d6ac9002727af4426d8748609fdb7e4094fa65ad8d681ea60082a7a5a",
                   array=True),
        RemoteFile("binarized_mnist_valid.amat", "069b4f0beb389b776478c3e872b4df71c95ac4be64d7cbe6d32e24ebac8e6d5e",
                   array=True),
        RemoteFile("binarized_mnist_test.amat", "ca0294c3b8d984c7a1dc891015a8eea6f37bae59a34e35ea0fc8c47110a8dd86",
                   array=True),
    )),
}


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def array_sha256(path: Path) -> str:
    """SHA-256 of an ``.amat`` split parsed to a C-ordered uint8 array."""
    from vae_priors.experiments.data.formats import read_amat

    return hashlib.sha256(np.ascontiguousarray(read_amat(path).astype(np.uint8)).tobytes()).hexdigest()


def _digest(remote: RemoteFile) -> Callable[[Path], str]:
    return array_sha256 if remote.array else file_sha256


def _ok(path: Path, remote: RemoteFile) -> bool:
    try:
        return path.is_file() and _digest(remote)(path) == remote.sha256
    except ValueError:  # an unparseable .amat
        return False


def fetch(name: str, directory: str | Path, base_url: str | None = None, timeout: float = 60.0,
          log: Callable[[str], None] = print) -> list[Path]:
    """Download the files of data set ``name`` into ``directory``; returns their paths."""
    if name not in SOURCES:
        raise FetchError(f"no download is known for data set {name!r}; choose one of {', '.join(SOURCES)}")
    default_url, files = SOURCES[name]
    url = (base_url or default_url).rstrip("/") + "/"
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for remote in files:
        path = directory / remote.name
        if _ok(path, remote):
            log(f"{path}: present and verified")
        else:
            _download(url + remote.name, path, remote, timeout)
            log(f"{path}: downloaded and verified")
        paths.append(path)
    return paths


def _download(url: str, path: Path, remote: RemoteFile, timeout: float) -> None:
    with atomic_path(path) as tmp:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
                shutil.copyfileobj(response, out)
        except OSError as err:  # URLError, HTTPError, timeouts and refused connections are OSErrors
            raise FetchError(f"cannot download {url} ({err}); check the network or pass --base-url MIRROR") from None
        try:
            actual = _digest(remote)(tmp)
        except ValueError as err:
            raise FetchError(f"{url} is not a readable {remote.name} ({err}); nothing was kept") from None
        if actual != remote.sha256:
            what = "its parsed array" if remote.array else "the file"
            raise FetchError(f"{url}: SHA-256 of {what} is {actual}, expected {remote.sha256}; the download is "
                             "corrupt or not the published file, so it was not kept")
