"""The few things the training loop needs from torch.distributed (torchrun sets the
environment; a plain `python` run is a world of one)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init_world(device: str) -> World:
    """Join the process group when run under torchrun (gloo on CPU, nccl on CUDA)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
    world = current_world()
    if device.startswith("cuda"):
        torch.cuda.set_device(world.local_rank)
    return world


def current_world() -> World:
    """The process group this process is in (a world of one without torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def broadcast_object(world: World, obj):
    """Rank 0's `obj` on every rank."""
    if not world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.rows = dist.get_rank(), len(x)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_with_grad(world: World, x: torch.Tensor) -> torch.Tensor:
    """All ranks' `x` (equal sizes) concatenated in rank order, differentiable. When every
    rank computes the same loss on the result, DDP's gradient averaging then gives exactly
    the single-process gradient of that loss."""
    if not world.distributed:
        return x
    return _GatherWithGrad.apply(x)


def gather(world: World, x: torch.Tensor) -> torch.Tensor:
    if not world.distributed:
        return x
    parts = [torch.empty_like(x) for _ in range(world.size)]
    dist.all_gather(parts, x)
    return torch.cat(parts, dim=0)


def cleanup(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
