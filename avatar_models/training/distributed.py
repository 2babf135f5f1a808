"""torch.distributed plumbing shared by the training engine and anchor-parallel sampling.

Everything reads the environment that ``torchrun`` sets (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); without it (plain ``python``), the world is
one process and no process group is created. The backend is NCCL when CUDA is available and
gloo otherwise, so the same command runs on GPUs and on a CPU box.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place in the job and the device it computes on."""

    rank: int
    size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def setup_world(device: str | torch.device | None = None) -> World:
    """Join the torchrun job described by the environment (initialising the default process
    group once), or describe a one-process world. ``device`` None picks ``cuda:LOCAL_RANK``
    when CUDA is available, else the CPU."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), local_rank, device)
    if size > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=size)
    return World(rank, size, local_rank, device)


def teardown_world() -> None:
    """Destroy the default process group if one exists (end of a CLI command)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def gather_to_main(obj, world: World) -> list | None:
    """Every rank's ``obj`` (JSON-like) as a list on rank 0; None on the other ranks."""
    if not world.distributed:
        return [obj]
    out = [None] * world.size if world.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_mean(values: torch.Tensor, world: World) -> torch.Tensor:
    """Mean over ranks of a small tensor (loss terms for logging)."""
    if not world.distributed:
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values / world.size


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Make every rank's parameters and buffers equal to rank ``src``'s (before FSDP sharding,
    which shards whatever each rank holds)."""
    if not dist.is_initialized():
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=src)


def shard_range(count: int, rank: int, size: int) -> tuple[int, int]:
    """[lo, hi) of ``count`` items given to ``rank`` of ``size``: contiguous, sizes differing
    by at most one, lower ranks first."""
    base, extra = divmod(count, size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)
