"""Versions, hardware and the command line of a run, for the JSON output and the table header."""
from __future__ import annotations

import contextlib
import datetime
import os
import platform
from typing import Any

import timm
import torch
import torchvision

from .. import __version__

__all__ = ["environment"]


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def environment(device: str, command: str, world_size: int = 1) -> dict[str, Any]:
    """Versions, hardware and the command, for the JSON output and the table header."""
    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "effidense": __version__,
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "world_size": world_size,
    }
    if device == "cuda" and torch.cuda.is_available():
        env.update(device_name=torch.cuda.get_device_name(0), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(), gpu_count=torch.cuda.device_count(),
                   gpu_memory_bytes=torch.cuda.get_device_properties(0).total_memory)
    else:
        env["device_name"] = env["cpu"]
    return env
