"""Data-parallel SVI over ``torch.distributed``: the process group torchrun sets up, and each rank's share of a batch.

Launched by ``torchrun --nproc_per_node=W vae-priors run ...``, every rank builds the same pair from the same seed
and draws the same epoch permutation from the same seeded generator; rank r takes its slice S_r (|S_r| = B_r) of each
global batch B and runs it through ``subsample(S_r, N)``, so Pyro scales its sites by N / B_r and its loss

    L_r = -(1 / B_r) sum_{n in S_r} ELBO_n        (objective / N, the per-point loss)

is on its own an unbiased estimate of the full-data loss. Each rank steps on ``(B_r W / B) L_r``; averaging the
gradients over the W ranks gives

    (1 / W) sum_r (B_r W / B) grad L_r = -(1 / B) sum_{n in B} grad ELBO_n,

exactly the gradient one process takes on the global batch, uneven shards included (a last batch of 7 points on 2
ranks: 4 and 3). Gradient clipping and Adam then act on identical averaged gradients, so the parameters stay equal
on every rank. A rank whose shard is empty (a global batch smaller than W) runs one point with weight 0: every rank
must take part in each gradient all-reduce.

The averaging is ``torch.nn.parallel.DistributedDataParallel`` around the objective (``ELBO(...)(model, guide)`` is an
``nn.Module`` whose parameters are the model's and the guide's; Pyro's param store is not used, see svi.py), so the
all-reduce overlaps the backward pass. ``find_unused_parameters=True`` because a pair may own parameters one step
does not reach (DDP raises otherwise; Pyro's Lightning example meets the same); DDP also broadcasts rank 0's
parameters and buffers when it wraps, so the ranks start from the same state even if their pairs were built apart.

Each rank draws its Monte Carlo noise from its own stream (rank 0 keeps the seed of a one-process run, rank r > 0
is reseeded at each epoch from (seed, rank, epoch)): with one stream, the points at the same position of every
shard would share their noise and the average would be noisier than the one-process gradient. So a run on W
processes is reproducible for a given W, and equal to the one-process run in expectation, not bit for bit.

Without a process group (a plain ``vae-priors run``) none of this runs: ``world()`` is (0, 1) and ``fit`` is the
one-process loop, unchanged.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

# Ranks > 0 wait in a collective while rank 0 alone writes files, evaluates and diagnoses; gloo's default of
# 30 minutes is shorter than an MNIST evaluation with 1 000 draws on a CPU.
COLLECTIVE_TIMEOUT = timedelta(hours=12)


def launched_by_torchrun() -> bool:
    """True when the environment names more than one process (torchrun's ``WORLD_SIZE``)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_environment(device_type: str = "cpu") -> bool:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA); False when there is none to join.

    torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; its own rendezvous
    (``--standalone``, or ``--nnodes`` with ``--rdzv-endpoint``) finds the other processes.
    """
    if not launched_by_torchrun() or dist.is_initialized():
        return dist.is_initialized()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed; run one process")
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    return True


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def world() -> tuple[int, int]:
    """(rank, world size) of the process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """The process that writes files: rank 0, or the only process."""
    return world()[0] == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def device_for(device_type: str) -> torch.device:
    """``cuda:LOCAL_RANK`` for a CUDA run under torchrun (one GPU per process), else the device as configured."""
    if device_type == "cuda" and world()[1] > 1:
        return torch.device("cuda", local_rank())
    return torch.device(device_type)


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def rank_seed(seed: int, rank: int, epoch: int) -> int:
    """The seed of rank ``rank`` > 0 at the start of ``epoch``: distinct per rank and epoch, fixed by ``seed``."""
    return (seed * 1_000_003 + rank * 10_007 + epoch) % 2**63


def shard(index: torch.Tensor) -> tuple[torch.Tensor, float]:
    """This rank's slice of the global batch ``index`` and the weight B_r W / B its loss is stepped on.

    Contiguous slices of sizes differing by at most one; an empty slice becomes the batch's first point with
    weight 0, so the rank still runs a forward and backward pass for DDP's all-reduce.
    """
    rank, size = world()
    if size == 1:
        return index, 1.0
    mine = index.tensor_split(size)[rank]
    if len(mine) == 0:
        return index[:1], 0.0
    return mine, len(mine) * size / len(index)


def sum_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The sum of ``value`` over all ranks (``value`` itself without a process group); does not modify it."""
    if world()[1] == 1:
        return value
    total = value.detach().clone()
    if dist.get_backend() == "nccl":  # nccl reduces CUDA tensors only
        total = total.cuda()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.to(value.device)


def shard_points(num_points: int) -> torch.Tensor:
    """This rank's contiguous share of ``range(num_points)`` (all of it without a process group)."""
    rank, size = world()
    return torch.arange(num_points).tensor_split(size)[rank]


def gather_points(value: torch.Tensor, num_points: int) -> torch.Tensor:
    """Every rank's ``value`` (..., its ``shard_points(num_points)``) joined along the last axis, on every rank."""
    size = world()[1]
    if size == 1:
        return value
    device = value.device
    if dist.get_backend() == "nccl":  # nccl gathers CUDA tensors only
        value = value.cuda()
    sizes = [len(part) for part in torch.arange(num_points).tensor_split(size)]
    padded = value.new_zeros(*value.shape[:-1], max(sizes))  # all_gather wants equal shapes
    padded[..., : value.shape[-1]] = value
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[..., :n] for part, n in zip(parts, sizes, strict=True)], -1).to(device)


def gather_rows(value: torch.Tensor, num_points: int) -> torch.Tensor:
    """``gather_points`` for per-point rows: every rank's ``value`` (its shard's points, ...) joined along axis 0."""
    if world()[1] == 1:
        return value
    return gather_points(value.movedim(0, -1), num_points).movedim(-1, 0)


def shards_points(num_points: int) -> bool:
    """Whether per-point work over ``num_points`` is split over ranks: under a process group, with a point for
    every rank (fewer points than ranks: every rank computes all of them, as one process would)."""
    size = world()[1]
    return size > 1 and num_points >= size


def point_seed(seed: int) -> int:
    """The seed of this rank's share of per-point Monte Carlo work: ``seed`` on rank 0 (a one-process run's
    numbers for its points), a distinct stream on every other rank so that no two shards share their noise."""
    rank = world()[0]
    return seed if rank == 0 else rank_seed(seed, rank, -1)


def replicate(objective: nn.Module) -> nn.Module:
    """The module to run the forward pass through: DDP around ``objective`` under a process group, else itself.

    Optimizer, checkpoints and ``state_dict`` keep using ``objective``: DDP shares its parameter tensors.
    """
    if world()[1] == 1:
        return objective
    device = next(objective.parameters()).device
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(objective, device_ids=ids, find_unused_parameters=True)


def from_main(value: object) -> object:
    """Rank 0's ``value`` on every rank (a picklable object, e.g. the run directory rank 0 created)."""
    if world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
