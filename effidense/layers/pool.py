"""Pooling that keeps nothing of its input for backward.

Native pooling saves its input for backward, yet the backward kernels read only the input's shape and strides (and,
for max pooling, the argmax indices). These Functions call the same kernels, so gradients are bitwise native, and no
memory mode has to keep, or recompute, the maps they pool.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["avg_pool", "max_pool"]


class AvgPool2x2(torch.autograd.Function):
    """``F.avg_pool2d(x, 2)`` that keeps nothing for backward but the input's layout: native average pooling saves its
    input, yet its backward reads only the input's shape and strides."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.layout = x.shape, x.stride()
        return F.avg_pool2d(x, 2)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        like = grad.new_empty_strided(*ctx.layout)  # never read: shape and strides only
        return torch.ops.aten.avg_pool2d_backward(grad, like, [2, 2], [2, 2], [0, 0], False, True, None)


class MaxPool3x3(torch.autograd.Function):
    """``F.max_pool2d(x, 3, 2, 1)`` that keeps only the argmax indices for backward (as int32 where they fit), not its
    input: native max pooling's backward reads the input's shape and strides alone."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        out, indices = torch.ops.aten.max_pool2d_with_indices(x, [3, 3], [2, 2], [1, 1])
        ctx.layout = x.shape, x.stride()
        if x.shape[-2] * x.shape[-1] <= torch.iinfo(torch.int32).max:
            indices = indices.to(torch.int32)
        ctx.save_for_backward(indices)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (indices,) = ctx.saved_tensors
        like = grad.new_empty_strided(*ctx.layout)  # never read: shape and strides only
        return torch.ops.aten.max_pool2d_with_indices_backward(grad, like, [3, 3], [2, 2], [1, 1], [1, 1], False,
                                                               indices.long())


def avg_pool(x: Tensor) -> Tensor:
    """2x2 average pooling (transitions)."""
    return AvgPool2x2.apply(x) if torch.is_grad_enabled() and x.requires_grad else F.avg_pool2d(x, 2)


def max_pool(x: Tensor) -> Tensor:
    """3x3/2 max pooling (the ImageNet stem)."""
    return MaxPool3x3.apply(x) if torch.is_grad_enabled() and x.requires_grad else F.max_pool2d(x, 3, 2, 1)
