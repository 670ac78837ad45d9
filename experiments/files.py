"""Atomic file output: every file the project writes appears whole or not at all.

A write that fails (disk full, file-size limit, permission denied) deletes its temporary file and raises a
``WriteError`` naming the file; a torch file that cannot be read back raises a ``FileFormatError`` naming it.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import torch

UMASK = os.umask(0)
os.umask(UMASK)


class WriteError(OSError):
    """A file could not be written; nothing partial was left. The message names the file and what to do."""


class FileFormatError(ValueError):
    """A file exists but cannot be read: truncated, empty, corrupted or not the expected format."""


def _write_error(path: Path, err: BaseException) -> WriteError:
    # torch's zip writer reports a short write as "[enforce fail at inline_container.cc] ...": say what it means
    reason = getattr(err, "strerror", None) or "the write stopped early"
    return WriteError(f"could not write {path}: {reason}; nothing partial was left. Check that its directory is "
                      "writable and that the disk (or `ulimit -f`) has room, then try again")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``, on error delete it.

    :raises WriteError: on any ``OSError`` while writing, so the user learns which file failed.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise _write_error(path, err) from err
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp creates 0600; give the file the permissions open() would
        yield Path(tmp)
        os.replace(tmp, path)
    except WriteError:
        Path(tmp).unlink(missing_ok=True)
        raise
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise _write_error(path, err) from err
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_torch(obj: object, path: str | Path) -> None:
    """``torch.save`` through a temporary file and a rename."""
    with atomic_path(path) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError as err:  # torch's zip writer reports a failed write (e.g. disk full) as RuntimeError
            raise _write_error(Path(path), err) from err


def load_torch(path: str | Path, what: str, *, map_location: str | torch.device = "cpu",
               weights_only: bool = True) -> object:
    """``torch.load`` whose failures name the file: missing, truncated, empty or not a torch file.

    :param what: what the file should be ("checkpoint", "trained pair"), for the message.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except PermissionError:
        raise  # the CLI names the file and the fix
    except (EOFError, OSError, RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, KeyError,
            AttributeError, IndexError) as err:  # a truncated zip is an OSError (EINVAL) from torch's reader
        size = path.stat().st_size
        state = "empty" if size == 0 else f"truncated or not a torch file ({size} bytes; {_first_line(err)})"
        raise FileFormatError(f"cannot read {what} {path}: the file is {state}. It was damaged (a full disk or a "
                              "copy that did not finish?); restore it, or delete it to redo that step") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:160]}" if text else type(err).__name__


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_csv(path: str | Path, frame: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


class StateMismatchError(FileFormatError):
    """A saved state (checkpoint, trained pair) does not fit the module the current code and config build."""


def load_state(module: torch.nn.Module, state: object, path: str | Path, what: str) -> None:
    """``module.load_state_dict(state)``, or one line saying how the file at ``path`` and the module differ.

    Checked by hand first because torch's own error lists every key over many lines.
    """
    if not isinstance(state, dict):
        raise FileFormatError(f"{path} does not hold a {what} (found {type(state).__name__}); restore it, or delete it "
                              "to redo that step")
    own = module.state_dict()
    # a module's extra state (derived, such as the exemplar prior's neighbour table) may postdate the file: the
    # module rebuilds it (``ExemplarPrior._load_from_state_dict``)
    missing = sorted(k for k in set(own) - set(state) if not k.endswith("._extra_state"))
    extra = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and getattr(state[k], "shape", None) is not None and state[k].shape != own[k].shape]
    problems = [f"{label} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                for label, keys in (("missing", missing), ("unexpected", extra), ("shape", shapes)) if keys]
    if problems:
        raise StateMismatchError(f"{path} does not match the {what} that the current code and config build "
                                 f"({'; '.join(problems)}): the code or the config changed since it was written. Use "
                                 "the code version in provenance.toml, or start a new run")
    module.load_state_dict(state)
