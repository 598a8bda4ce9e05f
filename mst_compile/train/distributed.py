"""DDP plumbing for runs under ``torchrun``: process group, device, and the few collectives the loop needs.

``torchrun`` sets RANK / WORLD_SIZE / LOCAL_RANK; without them everything here is a no-op for a
single process (``--fsdp`` then runs as one rank: a process group of one, which FSDP2 needs).
Backend: nccl on GPUs, gloo on CPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    started: bool = False  # True if this module created the process group (and must destroy it)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def on(self) -> bool:
        return self.world > 1

    def all_sum(self, values: list[float]) -> list[float]:
        """Sum a few floats over ranks in one collective (losses, stop flags)."""
        if not self.on:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def broadcast(self, obj):
        """Rank 0's Python object on every rank."""
        if not self.on:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        if not self.on:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.on:
            dist.barrier()

    def close(self) -> None:
        if self.started and dist.is_initialized():
            dist.destroy_process_group()


def backend_for(device: torch.device) -> str:
    """The process-group backend for this process's device: nccl on GPUs, gloo on CPU (the rest is the same code)."""
    return "nccl" if device.type == "cuda" else "gloo"


def setup(device: str = "auto", sharded: bool = False) -> Dist:
    """Join the torchrun process group if there is one and pick this process's device; ``sharded``
    (``--fsdp``) in a single process: start a process group of one rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but CUDA is not available; use --device cpu")
    if use_cuda:
        dev = torch.device(f"cuda:{local}") if world > 1 or device in ("auto", "cuda") else torch.device(device)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    started = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend_for(dev), device_id=dev if use_cuda else None)
        started = True
    elif sharded and not dist.is_initialized():  # one process: an in-memory store, no rendezvous
        dist.init_process_group(backend=backend_for(dev), store=dist.HashStore(), rank=0, world_size=1,
                                device_id=dev if use_cuda else None)
        started = True
    return Dist(rank, world, local, dev, started)
