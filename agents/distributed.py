"""Data-parallel helpers for ``torchrun`` (gloo on CPU, NCCL on GPU).

The trainers do not wrap the student in ``DistributedDataParallel``: loss modules own the
student (and sometimes a target copy), so instead every process computes gradients on its
shard of the global batch and ``all_reduce_gradients`` averages them before the optimizer
step. With equal shards and a per-sample-mean loss this gives the same update as one process
on the whole global batch.

Launch: ``torchrun --nproc-per-node 2 -m tdkd.cli distill ...``; ``init_from_env`` reads
RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set by torchrun and is a no-op without them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tensordict import TensorDictBase

__all__ = [
    "DistInfo",
    "init_from_env",
    "shutdown",
    "all_reduce_gradients",
    "all_reduce_mean",
    "broadcast_module",
    "shard_batch",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` in ``[0, world_size)``; rank 0 writes files."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_from_env(backend: str | None = None) -> DistInfo:
    """Join the process group described by torchrun's environment variables.

    Args:
        backend: "gloo" or "nccl"; default NCCL when CUDA is available, else gloo.

    Returns:
        ``DistInfo``; ``DistInfo()`` (single process) when WORLD_SIZE is unset or 1.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got backend={backend!r}")
    if not dist.is_initialized():
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    log.info("joined process group: rank %d of %d (%s)", rank, world_size, backend)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank)


def shutdown() -> None:
    """Leave the process group (no-op when none)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_gradients(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Average ``.grad`` over processes in one flat buffer: g <- (1/W) sum_w g_w.

    Parameters without a gradient take part as zeros, so every process sends the same layout.
    """
    if not _active():
        return
    params = [p for p in parameters if p.requires_grad]
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for p in params:
        n = p.numel()
        chunk = flat[offset : offset + n].view_as(p)
        if p.grad is None:
            p.grad = chunk.clone()
        else:
            p.grad.copy_(chunk)
        offset += n


def all_reduce_mean(values: dict[str, float]) -> dict[str, float]:
    """Average scalar metrics over processes (identity in a single process)."""
    if not _active() or not values:
        return dict(values)
    keys = sorted(values)
    flat = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    return dict(zip(keys, flat.tolist(), strict=True))


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Copy parameters and buffers of rank ``src`` to every process."""
    if not _active():
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=src)


def shard_batch(batch: TensorDictBase, info: DistInfo) -> TensorDictBase:
    """This process's contiguous slice of a global batch [B] -> [B / W].

    Raises ValueError unless B is divisible by the world size (equal shards keep the averaged
    gradient equal to the single-process one).
    """
    size = batch.batch_size[0]
    if size % info.world_size:
        raise ValueError(
            f"global batch size {size} is not divisible by world_size={info.world_size}; "
            "choose a batch size that is a multiple of the number of processes"
        )
    shard = size // info.world_size
    return batch[info.rank * shard : (info.rank + 1) * shard]
