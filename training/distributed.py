"""Process-group setup for single-process, torchrun (multi-GPU / multi-node) and CPU gloo runs.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT; without them this is a
single process. NCCL on CUDA, gloo on CPU. Models are wrapped in DDP (replicated weights,
averaged gradients) or FSDP2 (`fully_shard`: sharded weights, gradients and optimizer
state, for models that do not fit one device).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)

Strategy = Literal["ddp", "fsdp"]


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (if any) and pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        log.info("process %d of %d on %s", rank, world, dev)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def wrap_model(
    model: nn.Module, info: DistInfo, strategy: Strategy = "ddp", find_unused_parameters: bool = False
) -> nn.Module:
    """DDP or FSDP2 wrapper for a trainable model; the model itself when running one process.

    find_unused_parameters: DDP must know when some parameters get no gradient in a step.
    """
    if not info.distributed:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [info.local_rank] if info.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused_parameters)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        # FSDP2 cannot shard 0-d parameters (the gates' log_alpha): they stay replicated and
        # their gradients are averaged by `sync_replicated_grads`.
        replicated = {p for p in model.parameters() if p.ndim == 0}
        # Shard each transformer block separately, then the rest (PyTorch's recommended FSDP2 use).
        for block in model.modules():
            if type(block).__name__ in ("PatchBlock", "PixelBlock"):
                fully_shard(block)
        fully_shard(model, ignored_params=replicated)
        model._replicated_params = sorted(replicated, key=id)  # type: ignore[attr-defined]
        return model
    raise ValueError(f"unknown distributed strategy {strategy!r}; use 'ddp' or 'fsdp'")


def all_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean of a scalar over processes (for logging the global loss)."""
    if not info.distributed:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / info.world_size


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()


def average_gradients(params: list[torch.Tensor], info: DistInfo) -> None:
    """All-reduce the gradients of (plain, unsharded) `params` to their mean, as one flat buffer."""
    if not info.distributed:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= info.world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def sync_replicated_grads(model: nn.Module, info: DistInfo) -> None:
    """Average the gradients FSDP left to us (its ignored, replicated parameters); no-op otherwise."""
    average_gradients(getattr(model, "_replicated_params", []), info)


def clip_gradients(params: list[torch.Tensor], max_norm: float) -> float:
    """Clip the global gradient norm of a mix of sharded (DTensor) and plain parameters; returns it."""
    from torch.distributed.tensor import DTensor

    groups = [
        [p for p in params if p.grad is not None and isinstance(p, DTensor) == sharded] for sharded in (1, 0)
    ]
    squares = []
    for group in groups:
        if group:
            norm = torch.nn.utils.get_total_norm([p.grad for p in group])
            norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
            squares.append(norm.float().square())
    if not squares:
        return 0.0
    total = torch.stack(squares).sum().sqrt()
    for group in groups:
        if group:
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total.item()
