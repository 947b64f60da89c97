"""Building the variants and timing one training step of each."""
from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..benchmark import (
    autocast,
    build_variant,
)
from ..modelspec import ModelSpec
from .plan import VARIANTS


def build_model(name: str, spec: ModelSpec, compile_options: dict[str, Any]) -> nn.Module:
    """A fresh uncompiled model for variant ``name`` (compile with :func:`compile_variant` after loading weights)."""
    if name == "tv":
        model = build_variant("tv", spec)
        for module in model.modules():  # torchvision's dense layers each carry the switch
            if hasattr(module, "memory_efficient"):
                module.memory_efficient = False
        return model
    if name == "tv-me":
        return build_variant("tv", spec)
    if name == "timm-ckpt":
        return build_variant("timm", spec)
    if name in VARIANTS:
        return build_variant(name.split("+")[0], spec)
    raise ValueError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")


def compile_variant(name: str, model: nn.Module, compile_options: dict[str, Any]) -> nn.Module:
    if name == "efficient+set_compile":
        return model.set_compile(True, **compile_options)
    if name == "efficient+torch.compile":
        return torch.compile(model, **compile_options)
    return model


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, amp: str | None) -> torch.Tensor:
    with autocast(x.device, amp):
        out = model(x)
    return F.cross_entropy(out.float(), y)


def _step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, amp: str | None) -> None:
    """One training step without the optimizer update: zero_grad, forward, loss, backward."""
    model.zero_grad(set_to_none=True)
    _loss(model, x, y, amp).backward()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, amp: str | None) -> tuple[float, float]:
    """(forward ms, backward ms): CUDA events on a GPU (queued kernels count), perf_counter on the CPU."""
    device = x.device
    model.zero_grad(set_to_none=True)
    _sync(device)
    if device.type == "cuda":
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        marks[0].record()
        loss = _loss(model, x, y, amp)
        marks[1].record()
        loss.backward()
        marks[2].record()
        _sync(device)
        return marks[0].elapsed_time(marks[1]), marks[1].elapsed_time(marks[2])
    t0 = time.perf_counter()
    loss = _loss(model, x, y, amp)
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    return (t1 - t0) * 1e3, (t2 - t1) * 1e3


def _batch(spec: ModelSpec, batch: int, img: int, device: torch.device, channels_last: bool,
           seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, spec.arg("in_chans"), img, img, generator=generator)
    y = torch.randint(0, spec.arg("num_classes"), (batch,), generator=generator)
    x = x.to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device)


def _release(device: torch.device) -> None:
    """Return a failed or finished model's GPU memory to the device (a full gc is too slow to run per probe on the
    CPU, where nothing needs returning)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


@contextlib.contextmanager
def _tf32(enabled: bool) -> Iterator[None]:
    """TF32 matmuls and convolutions on or off for the block (only matters on Ampere and later GPUs)."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
