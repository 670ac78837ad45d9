"""Process settings: how many torch threads a process uses, and what a run records about the machine it ran on.

Two processes with two OpenMP threads each on a 2-core machine made MNIST epochs 10-15x slower (threads spin
waiting for a descheduled partner), so the default gives each process its share of the cores: the cores this
process may run on divided by the number of processes torchrun starts on this machine (``LOCAL_WORLD_SIZE``).
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, which container limits narrow), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def default_threads() -> int:
    """This process's share of the cores: available cores // processes on this machine (torchrun's
    ``LOCAL_WORLD_SIZE``, 1 without torchrun), at least 1."""
    local_processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, available_cores() // local_processes)


def set_threads(threads: int = 0) -> int:
    """Set torch's intra-op threads to ``threads`` (0 = ``default_threads()``); returns the number set."""
    import torch

    count = threads if threads > 0 else default_threads()
    torch.set_num_threads(count)
    return count


def _git_commit(source: Path) -> str:
    try:
        out = subprocess.run(["git", "-C", str(source), "describe", "--always", "--dirty", "--abbrev=12"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def provenance(threads: int) -> dict[str, str | int]:
    """What produced a run: code version, library versions, machine and threads (written to the run directory)."""
    from importlib.metadata import PackageNotFoundError, version

    import pyro
    import torch

    try:
        ours = version("vae-priors")
    except PackageNotFoundError:
        ours = "not installed"
    return {"vae_priors": ours, "git_commit": _git_commit(Path(__file__).resolve().parent),
            "python": platform.python_version(), "torch": torch.__version__, "pyro": pyro.__version__,
            "machine": platform.machine(), "processor": platform.processor() or "unknown",
            "cores_available": available_cores(), "torch_threads": threads,
            "processes": int(os.environ.get("WORLD_SIZE", "1"))}  # torchrun ranks that trained the run
