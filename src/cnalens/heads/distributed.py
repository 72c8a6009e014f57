"""Sharding a scan over ``torch.distributed`` processes (``torchrun``, ``accelerate
launch``): start and stop the process group, and each process's rank."""

from __future__ import annotations

import os

import torch


def init_distributed() -> tuple[int, int, int]:
    """Start ``torch.distributed`` from the launcher's environment (``torchrun`` or
    ``accelerate launch`` set RANK, WORLD_SIZE, MASTER_ADDR, ...): backend ``nccl`` when
    CUDA is available (each process on ``cuda:LOCAL_RANK``), else ``gloo``. Returns
    (rank, world_size, local_rank); (0, 1, 0) without a launcher. Safe to call twice."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world <= 1 or "RANK" not in os.environ or not dist.is_available():
        return 0, 1, 0
    local = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), local


def finish_distributed() -> None:
    """Wait for every rank, then tear the process group down (an exit with a live gloo
    group can abort the process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def rank_world() -> tuple[int, int]:
    """(rank, world size) of an initialised process group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
