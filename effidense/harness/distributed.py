"""Process groups for the tools that run under DDP (bench, gradcheck, train): rendezvous, the group, torchrun's world,
and the model wrapped in DDP."""
from __future__ import annotations

import contextlib
import gc
import os
import socket
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["free_port", "process_group", "destroy_process_group", "torchrun_world", "backend_for", "check_world",
           "ddp_model"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a process group's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def process_group(backend: str, rank: int, world_size: int, init_method: str) -> Iterator[None]:
    """An initialised default process group for the duration of the block."""
    torch.distributed.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size)
    try:
        yield
    finally:
        destroy_process_group()


def destroy_process_group() -> None:
    """Destroy the default process group, once what still holds it in reference cycles is freed. DDP's reducer holds
    the group and drops it holding the GIL, which a gloo worker thread may still need to free a finished collective's
    tensors: the two would wait on each other. Freed while the group is registered, it leaves the group to this call,
    which releases the GIL. (A caller drops its own references, a DDP model's, first.)"""
    gc.collect()
    torch.distributed.destroy_process_group()


def torchrun_world() -> tuple[int, int, int] | None:
    """(rank, local_rank, world_size) when this process was started by torchrun with more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or "RANK" not in os.environ:
        return None
    return int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"])), world


def backend_for(device: str) -> str:
    """nccl between GPUs, gloo between CPU processes."""
    return "nccl" if device == "cuda" else "gloo"


def check_world(device: str, world: int) -> None:
    """Raise ValueError when ``world`` processes cannot each get their own ``device``."""
    if world < 1:
        raise ValueError(f"the number of processes must be at least 1, got {world}")
    if device == "cuda" and world > 1 and torch.cuda.device_count() < world:
        raise ValueError(f"{world} processes need {world} GPUs, torch sees {torch.cuda.device_count()}")


def ddp_model(model: nn.Module, device: torch.device, sync_bn: bool = False) -> nn.Module:
    """``model`` under DistributedDataParallel, its BatchNorms converted to ``nn.SyncBatchNorm`` with ``sync_bn``.

    DDP refuses SyncBatchNorm modules on CPU when it wraps them, because torch's own SyncBatchNorm needs a GPU;
    effidense's does not, so on CPU the norms are converted after wrapping (in place: DDP keeps the same parameters
    and buffers).
    """
    if sync_bn and device.type != "cpu":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if sync_bn and device.type == "cpu":
        nn.SyncBatchNorm.convert_sync_batchnorm(ddp.module)
    return ddp
