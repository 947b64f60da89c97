"""Versions, hardware and the command line of a run, for the JSON output and the table header."""
from __future__ import annotations

import contextlib
import datetime
import os
import platform
import shlex
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .. import __version__

__all__ = ["environment", "command_line", "TORCHRUN_ENV"]

# what torchrun (torch.distributed.run / elastic) sets in each worker; its own flags never reach the workers
TORCHRUN_ENV = ("TORCHELASTIC_RUN_ID", "LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                "MASTER_PORT")


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def command_line(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None,
                 orig_argv: Sequence[str] | None = None) -> dict[str, Any]:
    """How this run was started, as recorded, not rebuilt: ``command`` is this process's real command line
    (``sys.orig_argv``: interpreter, its flags, the script or ``-m`` module, the arguments), ``argv`` the arguments the
    command parsed (``sys.argv[1:]`` unless given), ``launcher`` ``"torchrun"`` when torchrun started this worker (it
    sets ``TORCHELASTIC_RUN_ID``; its own flags never reach the workers, so its variables are recorded instead) or
    ``"python"``."""
    environ = os.environ if environ is None else environ
    orig_argv = list(getattr(sys, "orig_argv", sys.argv) if orig_argv is None else orig_argv)
    record: dict[str, Any] = {
        "command": shlex.join(orig_argv),
        "argv": list(sys.argv[1:] if argv is None else argv),
        "launcher": "torchrun" if "TORCHELASTIC_RUN_ID" in environ else "python",
    }
    if record["launcher"] == "torchrun":
        record["torchrun"] = {name: environ[name] for name in TORCHRUN_ENV if name in environ}
    return record


def environment(device: str, argv: Sequence[str] | None = None, world_size: int = 1) -> dict[str, Any]:
    """Versions, hardware and how the run was started (:func:`command_line`), for the JSON output and the table
    header; ``argv`` is what the command parsed."""
    import timm
    import torchvision

    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **command_line(argv),
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
