"""Pooling for 1, 2 or 3 spatial dims that keeps nothing of its input for backward.

Native pooling saves its input, yet its backward kernels read only the input's shape and strides (and, for max
pooling, the argmax indices). These modules call the same kernels, so gradients are bitwise native, and no memory mode
has to keep, or recompute, the maps they pool. One spatial dim runs as two with a height of one, as torch's does.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .recompute import fx_leaf, is_tracing

__all__ = ["AvgPool", "MaxPool", "max_pool_input_grad"]

_AVG = {2: (F.avg_pool2d, torch.ops.aten.avg_pool2d_backward), 3: (F.avg_pool3d, torch.ops.aten.avg_pool3d_backward)}
_MAX = {2: (torch.ops.aten.max_pool2d_with_indices, torch.ops.aten.max_pool2d_with_indices_backward),
        3: (torch.ops.aten.max_pool3d_with_indices, torch.ops.aten.max_pool3d_with_indices_backward)}


class _Pooled(torch.autograd.Function):
    """Max (``indexed``) or average pooling that keeps the input's shape and strides (and max's argmax) only."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, kernel: list[int], stride: list[int], padding: list[int],
                indexed: bool) -> Tensor:
        ctx.layout, ctx.window, ctx.indexed = (x.shape, x.stride()), (kernel, stride, padding), indexed
        if not indexed:
            return _AVG[len(kernel)][0](x, kernel)
        out, indices = _MAX[len(kernel)][0](x, kernel, stride, padding)
        if math.prod(x.shape[2:]) <= torch.iinfo(torch.int32).max:  # indices count positions within one map
            indices = indices.to(torch.int32)
        ctx.save_for_backward(indices)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        like = grad.new_empty_strided(*ctx.layout)  # never read: shape and strides only
        kernel, stride, padding = ctx.window
        if not ctx.indexed:
            return _AVG[len(kernel)][1](grad, like, kernel, kernel, [0] * len(kernel), False, True, None), \
                None, None, None, None
        (indices,) = ctx.saved_tensors
        grad_x = _MAX[len(kernel)][1](grad, like, kernel, stride, padding, [1] * len(kernel), False, indices.long())
        return grad_x, None, None, None, None


class _Pool(nn.Module):
    indexed = False

    def __init__(self, spatial_dims: int = 2) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims

    def extra_repr(self) -> str:
        return f"spatial_dims={self.spatial_dims}"

    def window(self) -> tuple[list[int], list[int], list[int]]:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        node = fx_leaf(self, x)  # one node, as torch.nn's pools (torchvision's features.pool0)
        if node is not None:
            return node
        flat = self.spatial_dims == 1  # as a height-one 2D map
        x = x.unsqueeze(-2) if flat else x
        kernel, stride, padding = self.window()
        if not is_tracing() and torch.is_grad_enabled() and x.requires_grad:
            out = _Pooled.apply(x, kernel, stride, padding, self.indexed)
        elif not self.indexed:
            out = _AVG[len(kernel)][0](x, kernel)
        else:  # with no autocast policy, as the path above: CPU autocast would compute max_pool3d in float32
            with torch.autocast(x.device.type, enabled=False):
                out = (F.max_pool2d if len(kernel) == 2 else F.max_pool3d)(x, kernel, stride, padding)
        return out.squeeze(-2) if flat else out


class AvgPool(_Pool):
    """2-wide, stride-2 average pooling (transitions)."""

    def window(self) -> tuple[list[int], list[int], list[int]]:
        kernel = [1, 2] if self.spatial_dims == 1 else [2] * self.spatial_dims
        return kernel, kernel, [0] * len(kernel)

    def input_grad(self, like: Tensor, grad: Tensor) -> Tensor:
        """The gradient with respect to the pool's input, laid out as ``like`` (read for its shape and strides only),
        given that of its output: autograd's own kernel."""
        flat = self.spatial_dims == 1
        like, grad = (like.unsqueeze(-2), grad.unsqueeze(-2)) if flat else (like, grad)
        kernel = self.window()[0]
        grad_x = _AVG[len(kernel)][1](grad, like, kernel, kernel, [0] * len(kernel), False, True, None)
        return grad_x.squeeze(-2) if flat else grad_x


class MaxPool(_Pool):
    """3-wide, stride-2, padding-1 max pooling (the ImageNet stem)."""

    indexed = True

    def window(self) -> tuple[list[int], list[int], list[int]]:
        if self.spatial_dims == 1:
            return [1, 3], [1, 2], [0, 1]
        return [3] * self.spatial_dims, [2] * self.spatial_dims, [1] * self.spatial_dims

    def input_grad(self, x: Tensor, grad: Tensor) -> Tensor:
        """The gradient with respect to ``x`` given that of this pool's output (:func:`max_pool_input_grad`)."""
        return max_pool_input_grad(x, grad, *self.window())


def max_pool_input_grad(x: Tensor, grad: Tensor, kernel: list[int], stride: list[int], padding: list[int]) -> Tensor:
    """The gradient with respect to ``x`` of max pooling by this window (one spatial dim given as two, the first of
    height one), given that of its output: autograd's own kernel, with the argmax recomputed from ``x`` (for a caller
    that rebuilds ``x`` in backward)."""
    flat = x.dim() == len(kernel) + 1  # one spatial dim, pooled as a height-one 2D map
    x, grad = (x.unsqueeze(-2), grad.unsqueeze(-2)) if flat else (x, grad)
    forward, backward = _MAX[len(kernel)]
    indices = forward(x, kernel, stride, padding)[1]  # the pooled map itself is dropped at once
    grad_x = backward(grad, x, kernel, stride, padding, [1] * len(kernel), False, indices)
    return grad_x.squeeze(-2) if flat else grad_x
