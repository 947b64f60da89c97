"""Building the variants, their batches, and the device settings around a step (the step itself is
:func:`effidense.benchmark.training_step`, the one training step of the tools)."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..harness import build_variant
from ..modelspec import ModelSpec
from .plan import VARIANTS


def build_model(name: str, spec: ModelSpec, compile_options: dict[str, Any]) -> nn.Module:
    """A fresh uncompiled model for variant ``name`` (compile with :func:`compile_variant` after loading weights)."""
    if name in VARIANTS:
        return build_variant(name.split("+")[0], spec)
    raise ValueError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")


def compile_variant(name: str, model: nn.Module, compile_options: dict[str, Any]) -> nn.Module:
    if name == "efficient+torch.compile":
        return torch.compile(model, **compile_options)
    return model


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """TF32 matmuls and convolutions on or off for the block (only matters on Ampere and later GPUs)."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
