"""torch.distributed for training: the process group from torchrun's environment and the few collectives the
trainer needs. In a single process (no ``WORLD_SIZE`` > 1) every function is a no-op.

``torchrun --nproc-per-node N -m mtrank train CONFIG --out RUN`` (or ``mtrank train --nproc N``) starts N
processes with ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE`` and a rendezvous address set; ``init`` joins them with
gloo on CPU and nccl on CUDA (one GPU per local rank).
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def gpu_count() -> int:
    """CUDA devices this process can use (0 without CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def local_world_size() -> int:
    """Processes of this run on this machine (torchrun's ``LOCAL_WORLD_SIZE``; 1 alone)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def init(use_cuda: bool, timeout_s: float = 600.0) -> tuple[torch.device, int, int]:
    """Join the process group torchrun describes -> (device, rank, world size); (default device, 0, 1) alone."""
    world = env_world_size()
    if world <= 1:
        return torch.device("cuda" if use_cuda else "cpu"), 0, 1
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return device, dist.get_rank(), dist.get_world_size()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_(t: torch.Tensor, mean: bool = False) -> torch.Tensor:
    """Sum (or mean) of ``t`` over ranks, in place; returns ``t``."""
    if active():
        dist.all_reduce(t)
        if mean:
            t /= dist.get_world_size()
    return t


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
