"""Pooling for 1, 2 or 3 spatial dims that keeps nothing of its input for backward.

Native pooling saves its input for backward, yet the backward kernels read only the input's shape and strides (and,
for max pooling, the argmax indices). These modules call the same kernels, so gradients are bitwise native, and no
memory mode has to keep, or recompute, the maps they pool. One spatial dim runs as two with a height of one, as torch's
own 1D pooling does.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .recompute import fx_leaf, is_tracing

__all__ = ["AvgPool", "MaxPool"]

_AVG = {2: (F.avg_pool2d, torch.ops.aten.avg_pool2d_backward), 3: (F.avg_pool3d, torch.ops.aten.avg_pool3d_backward)}
_MAX = {2: (torch.ops.aten.max_pool2d_with_indices, torch.ops.aten.max_pool2d_with_indices_backward),
        3: (torch.ops.aten.max_pool3d_with_indices, torch.ops.aten.max_pool3d_with_indices_backward)}


class _AvgPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, kernel: list[int]) -> Tensor:
        ctx.layout, ctx.kernel = (x.shape, x.stride()), kernel
        return _AVG[len(kernel)][0](x, kernel)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        like = grad.new_empty_strided(*ctx.layout)  # never read: shape and strides only
        kernel = ctx.kernel
        return _AVG[len(kernel)][1](grad, like, kernel, kernel, [0] * len(kernel), False, True, None), None


class _MaxPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, kernel: list[int], stride: list[int], padding: list[int]) -> Tensor:
        out, indices = _MAX[len(kernel)][0](x, kernel, stride, padding)
        ctx.layout, ctx.window = (x.shape, x.stride()), (kernel, stride, padding)
        if math.prod(x.shape[2:]) <= torch.iinfo(torch.int32).max:  # indices count positions within one map
            indices = indices.to(torch.int32)
        ctx.save_for_backward(indices)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        (indices,) = ctx.saved_tensors
        like = grad.new_empty_strided(*ctx.layout)  # never read: shape and strides only
        kernel, stride, padding = ctx.window
        grad_x = _MAX[len(kernel)][1](grad, like, kernel, stride, padding, [1] * len(kernel), False, indices.long())
        return grad_x, None, None, None


class _Pool(nn.Module):
    def __init__(self, spatial_dims: int = 2) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims

    def extra_repr(self) -> str:
        return f"spatial_dims={self.spatial_dims}"

    def forward(self, x: Tensor) -> Tensor:
        node = fx_leaf(self, x)  # one node, as torch.nn's pools (torchvision's features.pool0)
        if node is not None:
            return node
        if self.spatial_dims == 1:  # as a height-one 2D map
            return self._pool(x.unsqueeze(-2), 2).squeeze(-2)
        return self._pool(x, self.spatial_dims)

    def _keeps_nothing(self, x: Tensor) -> bool:
        return not is_tracing() and torch.is_grad_enabled() and x.requires_grad

    def _pool(self, x: Tensor, dims: int) -> Tensor:
        raise NotImplementedError


class AvgPool(_Pool):
    """2-wide, stride-2 average pooling (transitions)."""

    def _pool(self, x: Tensor, dims: int) -> Tensor:
        kernel = [2] * dims if self.spatial_dims > 1 else [1, 2]
        return _AvgPool.apply(x, kernel) if self._keeps_nothing(x) else _AVG[dims][0](x, kernel)


class MaxPool(_Pool):
    """3-wide, stride-2, padding-1 max pooling (the ImageNet stem)."""

    def _window(self, dims: int) -> tuple[list[int], list[int], list[int]]:
        if self.spatial_dims == 1:
            return [1, 3], [1, 2], [0, 1]
        return [3] * dims, [2] * dims, [1] * dims

    def input_grad(self, x: Tensor, grad: Tensor) -> Tensor:
        """The gradient with respect to ``x`` given ``grad``, the gradient of this pool's output: autograd's own
        backward kernel, with the argmax recomputed from ``x`` (for a caller that rebuilds ``x`` in backward)."""
        if self.spatial_dims == 1:
            return self._input_grad(x.unsqueeze(-2), grad.unsqueeze(-2), 2).squeeze(-2)
        return self._input_grad(x, grad, self.spatial_dims)

    def _input_grad(self, x: Tensor, grad: Tensor, dims: int) -> Tensor:
        kernel, stride, padding = self._window(dims)
        forward, backward = _MAX[dims]
        indices = forward(x, kernel, stride, padding)[1]  # the pooled map itself is dropped at once
        return backward(grad, x, kernel, stride, padding, [1] * dims, False, indices)

    def _pool(self, x: Tensor, dims: int) -> Tensor:
        kernel, stride, padding = self._window(dims)
        if self._keeps_nothing(x):
            return _MaxPool.apply(x, kernel, stride, padding)
        # As the path above, with no autocast policy: CPU autocast would compute max_pool3d in float32.
        with torch.autocast(x.device.type, enabled=False):
            return (F.max_pool2d if dims == 2 else F.max_pool3d)(x, kernel, stride, padding)
