"""The trainer's processes: one, or several under ``torchrun`` (nccl on GPU, gloo on CPU), and what they share."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from timm.utils.distributed import init_distributed_device_so

from .errors import TrainError

__all__ = ["Processes", "init_processes", "broadcast", "reduce_sum"]


@dataclass
class Processes:
    """This process's device and place among the training processes."""

    device: torch.device
    rank: int
    world_size: int
    distributed: bool

    @property
    def primary(self) -> bool:
        return self.rank == 0


def init_processes(args: argparse.Namespace) -> Processes:
    """Pick the device and join ``torchrun``'s process group when there is one."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TrainError(f"--device {device}: CUDA is not available")
    if args.sync_bn and not device.startswith("cuda"):
        raise TrainError("--sync-bn needs CUDA devices: torch's SyncBatchNorm does not run on CPU")
    info = init_distributed_device_so(device=device)  # reads torchrun's environment; gloo on CPU, nccl on CUDA
    return Processes(torch.device(info["device"]), info["global_rank"], info["world_size"], info["distributed"])


def broadcast(value: Any, procs: Processes) -> Any:
    """Rank 0's ``value`` on every rank."""
    if not procs.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def reduce_sum(values: list[float], procs: Processes) -> list[float]:
    """The sum over ranks (timm's reduce_tensor averages instead, which weights uneven shares wrongly)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=procs.device)
    if procs.distributed:
        dist.all_reduce(tensor)
    return tensor.tolist()
