"""The trainer's processes: one, or several under ``torchrun`` (nccl on GPU, gloo on CPU), and what they share."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from timm.utils.distributed import init_distributed_device_so
from torch import nn

from ..layers import BatchNormAct
from .errors import TrainError

__all__ = ["Processes", "init_processes", "broadcast", "reduce_sum", "check_sync_bn"]


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


def check_sync_bn(model: nn.Module, procs: Processes, model_name: str) -> None:
    """Refuse ``--sync-bn`` where it cannot run: on the CPU under ``torchrun``, a BatchNorm that is not effidense's
    would become torch's SyncBatchNorm, which runs on CUDA only."""
    if not (procs.distributed and procs.device.type == "cpu"):
        return
    foreign = [name for name, m in model.named_modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, BatchNormAct)]
    if foreign:
        raise TrainError(f"--sync-bn on the CPU: {model_name}'s BatchNorm {foreign[0]} would become torch's "
                         "SyncBatchNorm, which runs on CUDA only (effidense's models synchronise on the CPU too)")
