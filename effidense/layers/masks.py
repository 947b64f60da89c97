"""Masks a segment does not keep whole: a dropout's, drawn again in backward from the random state forward drew it
from, and a ReLU's or a dropout's sign, kept at one bit an element."""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ReluKeepingSign", "pack_bits", "random_state", "replayed", "unpack_bits"]


def random_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def replayed(dropout: Callable[[Tensor], Tensor], state: tuple, like: tuple) -> Tensor:
    """The dropout's scaled mask (0 or 1/(1-p)), drawn again from the state forward drew it from, on a tensor laid
    out as its input was, so the same elements draw the same numbers."""
    shape, stride, dtype, device = like
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        return dropout(torch.empty_strided(shape, stride, dtype=dtype, device=device).fill_(1))


def _bits(device: torch.device) -> Tensor:
    return torch.arange(8, dtype=torch.uint8, device=device)  # made where it is used: a fake one under fake tensors


def pack_bits(mask: Tensor) -> Tensor:
    """A bool tensor at one bit an element, each sample (along the first dim) in whole bytes of its own, so that
    samples can be unpacked apart: uint8, (samples, bytes)."""
    size = math.prod(mask.shape[1:])  # named, not -1: a view of an empty batch needs every size
    flat = F.pad(mask.reshape(mask.shape[0], size), (0, -size % 8)).view(mask.shape[0], -(-size // 8), 8)
    flat = flat.to(torch.uint8)
    return (flat << _bits(flat.device)).sum(2, dtype=torch.uint8)


def unpack_bits(packed: Tensor, shape: Sequence[int]) -> Tensor:
    """The bool tensor of ``shape`` (contiguous) whose samples :func:`pack_bits` packed into ``packed``."""
    bits = (packed.unsqueeze(2) >> _bits(packed.device)) & 1
    return bits.flatten(1)[:, :math.prod(shape[1:])].bool().view(shape)


class ReluKeepingSign(torch.autograd.Function):
    """``relu(x)`` by the ReLU module (its hooks fire) that keeps one bit per element for backward, not its output:
    the gradient is ReLU's own (``threshold_backward``: zero where the output is <= 0), bitwise."""

    @staticmethod
    def forward(ctx: Any, relu: nn.Module, x: Tensor) -> Tensor:
        y = relu(x)
        if y is x:  # an in-place ReLU (torchvision's)
            ctx.mark_dirty(x)
        ctx.save_for_backward(pack_bits(~(y <= 0)))
        ctx.shape = y.shape
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor]:
        (packed,) = ctx.saved_tensors
        zero = torch.zeros((), dtype=grad.dtype, device=grad.device)
        return None, torch.where(unpack_bits(packed, ctx.shape), grad, zero)
