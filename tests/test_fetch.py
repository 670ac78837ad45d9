"""Downloads through a loopback HTTP server: verified files are kept, anything else never is."""

from __future__ import annotations

import hashlib
import http.server
import threading
from pathlib import Path

import numpy as np
import pytest
from test_cli import vae_priors

from vae_priors.experiments.data import fetch as fetching
from vae_priors.experiments.data.fetch import FetchError, RemoteFile, fetch

SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


@pytest.fixture
def server(tmp_path):
    """Serves ``tmp_path / "served"`` on 127.0.0.1; yields (base URL, folder, list of requested paths)."""
    served = tmp_path / "served"
    served.mkdir()
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(served), **kwargs)

        def log_message(self, *args):  # quiet
            requests.append(self.path)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/", served, requests
    httpd.shutdown()


def _fake_source(monkeypatch, files: list[RemoteFile]):
    monkeypatch.setitem(fetching.SOURCES, "fake", ("http://unused.invalid/", tuple(files)))


def test_a_verified_file_is_kept_and_not_downloaded_again(server, tmp_path, monkeypatch):
    url, served, requests = server
    (served / "a.bin").write_bytes(b"exact bytes")
    _fake_source(monkeypatch, [RemoteFile("a.bin", hashlib.sha256(b"exact bytes").hexdigest())])
    out = tmp_path / "data"
    assert fetch("fake", out, base_url=url, log=lambda _: None) == [out / "a.bin"]
    assert (out / "a.bin").read_bytes() == b"exact bytes" and len(requests) == 1
    fetch("fake", out, base_url=url, log=lambda _: None)
    assert len(requests) == 1  # present and verified: no second download


def test_a_corrupt_download_is_refused_and_leaves_nothing(server, tmp_path, monkeypatch):
    url, served, _ = server
    (served / "a.bin").write_bytes(b"tampered")
    _fake_source(monkeypatch, [RemoteFile("a.bin", hashlib.sha256(b"exact bytes").hexdigest())])
    with pytest.raises(FetchError, match=r"SHA-256 of the file is .*expected .*not kept"):
        fetch("fake", tmp_path / "data", base_url=url, log=lambda _: None)
    assert list((tmp_path / "data").iterdir()) == []  # no file, no temporary


def test_amat_files_are_checked_by_the_hash_of_their_parsed_array(server, tmp_path, monkeypatch):
    url, served, _ = server
    rows = np.random.default_rng(0).integers(0, 2, size=(3, 784)).astype(np.uint8)
    (served / "x.amat").write_text("\n".join(" ".join(map(str, r)) for r in rows) + "\n")
    _fake_source(monkeypatch, [RemoteFile("x.amat", hashlib.sha256(rows.tobytes()).hexdigest(), array=True)])
    fetch("fake", tmp_path / "data", base_url=url, log=lambda _: None)
    assert (tmp_path / "data" / "x.amat").is_file()


def test_an_unreachable_server_is_one_clear_error(tmp_path, monkeypatch):
    _fake_source(monkeypatch, [RemoteFile("a.bin", "0" * 64)])
    with pytest.raises(FetchError, match=r"cannot download http://127.0.0.1:9/a.bin"):
        fetch("fake", tmp_path, base_url="http://127.0.0.1:9/", timeout=5, log=lambda _: None)


def test_cli_refuses_a_wrong_mnist_file_in_one_line_and_keeps_nothing(server, tmp_path):
    url, served, _ = server
    (served / "train-images-idx3-ubyte.gz").write_bytes(b"not mnist")
    result = vae_priors("data", "fetch", "mnist", str(tmp_path / "mnist"), "--base-url", url, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "expected 440fcabf" in result.stderr
    assert not any((tmp_path / "mnist").iterdir())
    unknown = vae_priors("data", "fetch", "cifar", str(tmp_path / "c"), cwd=tmp_path)
    assert unknown.returncode == 2 and "choose one of mnist, fashion-mnist, binarized-mnist" in unknown.stderr


@pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason="needs the MNIST files in ../shared/data/mnist")
def test_the_real_mnist_files_pass_their_published_hashes(server, tmp_path):
    url, served, _ = server
    for f in SHARED_MNIST.iterdir():
        (served / f.name).symlink_to(f)
    result = vae_priors("data", "fetch", "mnist", str(tmp_path / "mnist"), "--base-url", url, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "mnist").iterdir()) == sorted(p.name for p in SHARED_MNIST.iterdir())


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_the_idx_downloads_are_the_files_the_loader_reads(name):
    """What `data fetch` writes for an IDX data set is what `data.name = NAME` loads: the four standard names, each
    with a 64-digit SHA-256."""
    from vae_priors.experiments.data.formats import IDX_FILES

    files = fetching.SOURCES[name][1]
    assert sorted(f.name for f in files) == sorted(IDX_FILES.values())
    assert all(len(f.sha256) == 64 and int(f.sha256, 16) >= 0 and not f.array for f in files)
