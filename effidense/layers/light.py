"""Segments, and the light autograd Functions most of them rerun in.

A concatenation-norm-activation-convolution (:func:`concat_norm_conv`) or a stem's convolution-norm-activation-pool
(:func:`conv_norm_pool`) keeps only its input for backward. Native training-mode BatchNorm with ReLU reruns in a light
Function: forward calls the modules once (their hooks fire), keeps only the input maps, and backward rebuilds BatchNorm
and ReLU and calls the very kernels autograd calls for the plain model, dropping each map when done, so gradients are
bitwise the plain model's with fewer maps alive at once than a checkpoint's rerun. Any other norm or activation is
checkpointed (:func:`~.recompute.checkpointed`). Under ``create_graph=True`` the Functions differentiate a rerun
instead (:func:`differentiable_rerun`), so double backward works.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .norm import BatchNormAct
from .pool import MaxPool
from .recompute import checkpointed, is_tracing, rerun

__all__ = ["ConvNormReluPool", "NormReluConv", "ReluKeepingSign", "concat_norm_conv", "conv_norm_pool",
           "differentiable_rerun", "plain_conv"]


def _light(norm: nn.Module, act: nn.Module, conv: nn.Module) -> bool:
    """Whether ``norm``, ``act`` and ``conv`` can rerun in a light Function: native training-mode BatchNorm, ReLU, a
    convolution differentiated by hand, autograd recording and nobody tracing."""
    return isinstance(norm, BatchNormAct) and norm.act is None and type(act) is nn.ReLU and plain_conv(conv) \
        and torch.is_grad_enabled() and not is_tracing() and norm.native_training()


def concat_norm_conv(norm: nn.Module, act: nn.Module, conv: nn.Module, *maps: Tensor, light: bool) -> Tensor:
    """``conv(act(norm(*maps)))``; when ``light``, keeping only ``maps`` for backward."""
    if not light:
        return conv(act(norm(*maps)))
    if _light(norm, act, conv):
        return NormReluConv.apply(norm, act, conv, norm.weight, norm.bias, conv.weight, *maps)
    return checkpointed(True, lambda *t: conv(act(norm(*t))), *maps)


def conv_norm_pool(conv: nn.Module, norm: nn.Module, act: nn.Module, pool: nn.Module, x: Tensor) -> Tensor:
    """``pool(act(norm(conv(x))))``, keeping only ``x`` for backward."""
    if isinstance(pool, MaxPool) and _light(norm, act, conv):
        return ConvNormReluPool.apply(x, conv.weight, norm.weight, norm.bias, conv, norm, act, pool)
    return checkpointed(True, lambda t: pool(act(norm(conv(t)))), x)


class _Light(torch.autograd.Function):
    """Records the autocast state forward ran in (the convolution's casts are redone in backward) and the modules."""

    @staticmethod
    def setup(ctx: Any, x: Tensor, *modules: nn.Module) -> None:
        ctx.modules = modules
        ctx.autocast = torch.is_autocast_enabled(x.device.type), torch.get_autocast_dtype(x.device.type)


class NormReluConv(_Light):
    """``conv(relu(norm(*maps)))``, keeping only ``maps`` (kept anyway: earlier layers' outputs, or a bottleneck's).
    Backward rebuilds ``ReLU(BN(cat(maps)))``, never the convolution, and calls ``convolution_backward``, ReLU's
    ``threshold_backward``, the backward of whichever BatchNorm ran (native or cuDNN) and the concatenation's (a view
    per map): at most three maps of the concatenation's size are alive at once, where a checkpoint holds four."""

    @staticmethod
    def forward(ctx: Any, norm: nn.Module, relu: nn.ReLU, conv: nn.Module, bn_weight: Tensor | None,
                bn_bias: Tensor | None, conv_weight: Tensor, *maps: Tensor) -> Tensor:
        _Light.setup(ctx, maps[0], norm, relu, conv)
        ctx.save_for_backward(*maps)
        return conv(relu(norm(*maps)))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        maps, (norm, relu, conv) = ctx.saved_tensors, ctx.modules
        if torch.is_grad_enabled():
            return differentiable_rerun(ctx, grad, lambda *t: conv(relu(norm(*t))),
                                        (None, None, None, norm.weight, norm.bias, conv.weight), maps)
        need_w, need_b, need_conv, *need_maps = ctx.needs_input_grad[3:]
        x = maps[0] if len(maps) == 1 else torch.cat(maps, 1)
        y, bn_saved = _batch_norm_relu(norm, x)
        grad_y, grad_conv = _conv_backward(ctx, conv, grad, y, True, need_conv)
        grad_y = _relu_backward(grad_y.to(y.dtype), y)
        del y
        grad_x, grad_w, grad_b = _batch_norm_backward(norm, x, grad_y, bn_saved, [any(need_maps), need_w, need_b])
        del x, grad_y
        grad_maps = [None] * len(maps) if grad_x is None else [g if need else None for g, need in zip(
            grad_x.split([m.shape[1] for m in maps], 1), need_maps, strict=True)]
        return None, None, None, grad_w, grad_b, grad_conv, *grad_maps


def _batch_norm_relu(norm: nn.Module, x: Tensor) -> tuple[Tensor, tuple[Any, ...]]:
    """``ReLU(BN(x))`` with batch statistics and no running statistics, by the kernel ``F.batch_norm`` picks (native or
    cuDNN), and what its backward needs."""
    y, save_mean, save_invstd, reserve, impl = torch._batch_norm_impl_index(
        x, norm.weight, norm.bias, None, None, True, 0.0, norm.eps, torch.backends.cudnn.enabled)
    return y.relu_(), (save_mean, save_invstd, reserve, impl)


def _batch_norm_backward(norm: nn.Module, x: Tensor, grad_y: Tensor, saved: tuple[Any, ...],
                         mask: list[bool]) -> tuple[Tensor | None, ...]:
    save_mean, save_invstd, reserve, impl = saved
    if impl == 0:  # native: the kernel the dispatcher below calls, which compiles with symbolic sizes (it does not)
        return torch.ops.aten.native_batch_norm_backward(
            grad_y, x, norm.weight, None, None, save_mean, save_invstd, True, norm.eps, mask)
    return torch.ops.aten._batch_norm_impl_index_backward(
        impl, x, grad_y, norm.weight, None, None, save_mean, save_invstd, True, norm.eps, mask, reserve)


def _relu_backward(grad: Tensor, y: Tensor) -> Tensor:
    """ReLU's backward, written into ``grad`` (the backward's own buffer) where the strides agree, so the layout is
    autograd's; otherwise (1x1 maps under channels_last) made anew, as autograd makes it, so BatchNorm's backward
    sees the same layout and gives the same bits."""
    if grad.stride() != y.stride():
        return torch.ops.aten.threshold_backward(grad, y, 0)
    return torch.ops.aten.threshold_backward.grad_input(grad, y, 0, grad_input=grad)


def _conv_backward(ctx: Any, conv: nn.Module, grad: Tensor, x: Tensor, need_x: bool,
                   need_weight: bool) -> tuple[Tensor | None, Tensor | None]:
    """``convolution_backward`` as autograd runs it under forward's autocast state: on the inputs autocast gave the
    convolution, with the weight's gradient in the weight's dtype."""
    enabled, dtype = ctx.autocast

    def as_conv_sees(t: Tensor) -> Tensor:
        return t.to(dtype) if enabled and t.is_floating_point() and t.dtype != dtype else t

    grad_x, grad_weight, _ = torch.ops.aten.convolution_backward(
        grad, as_conv_sees(x), as_conv_sees(conv.weight), None, list(conv.stride), list(conv.padding),
        list(conv.dilation), False, [0] * len(conv.stride), conv.groups, [need_x, need_weight, False])
    return grad_x, None if grad_weight is None else grad_weight.to(conv.weight.dtype)


def differentiable_rerun(ctx: Any, grad: Tensor, run: Callable[..., Tensor], before: tuple[Tensor | None, ...],
                         maps: tuple[Tensor, ...], after: tuple[Tensor | None, ...] = ()) -> tuple[Tensor | None, ...]:
    """Gradients under ``create_graph=True``: those of ``run(*maps)``, a rerun of forward (under its autocast state,
    updating no running statistics) with a graph of its own, so a second backward works. ``apply`` took ``before``,
    ``maps``, ``after``. Each map is read through a view, so where one map was computed from another neither picks up
    the other's path, which the outer backward follows anyway."""
    views = tuple(m.view_as(m) for m in maps)
    enabled, dtype = ctx.autocast
    with rerun(), torch.autocast(grad.device.type, dtype=dtype, enabled=enabled):
        out = run(*views)
    needs = ctx.needs_input_grad
    wanted = [t for t, need in zip((*before, *views, *after), needs, strict=False) if need]
    grads = iter(torch.autograd.grad(out, wanted, grad, create_graph=True, allow_unused=True))
    return tuple(next(grads) if need else None for need in needs)


def plain_conv(conv: nn.Module) -> bool:
    """A convolution differentiated by hand here: no bias, zero padding given in numbers."""
    return isinstance(conv, nn.modules.conv._ConvNd) and not conv.transposed and conv.bias is None \
        and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple)


class ConvNormReluPool(_Light):
    """``pool(relu(norm(conv(x))))``, keeping only ``x``. Backward reruns the convolution and ``ReLU(BN(.))``, then
    calls autograd's kernels as :class:`NormReluConv` does, the pool's first (argmax recomputed): at most three maps
    of the convolution's size are alive at once, where a checkpoint holds four and a spare."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, conv_weight: Tensor, bn_weight: Tensor | None, bn_bias: Tensor | None,
                conv: nn.Module, norm: nn.Module, relu: nn.ReLU, pool: MaxPool) -> Tensor:
        _Light.setup(ctx, x, conv, norm, relu, pool)
        ctx.save_for_backward(x)
        return pool(relu(norm(conv(x))))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        (x,), (conv, norm, relu, pool) = ctx.saved_tensors, ctx.modules
        if torch.is_grad_enabled():
            return differentiable_rerun(ctx, grad, lambda t: pool(relu(norm(conv(t)))),
                                        (), (x,), (conv.weight, norm.weight, norm.bias))
        need_x, need_conv, need_w, need_b = ctx.needs_input_grad[:4]
        with torch.autocast(x.device.type, dtype=ctx.autocast[1], enabled=ctx.autocast[0]):
            c = conv._conv_forward(x, conv.weight, None)
        y, bn_saved = _batch_norm_relu(norm, c)
        grad_y = _relu_backward(pool.input_grad(y, grad), y)
        del y
        grad_c, grad_w, grad_b = _batch_norm_backward(norm, c, grad_y, bn_saved, [True, need_w, need_b])
        del c, grad_y
        grad_x, grad_conv = _conv_backward(ctx, conv, grad_c, x, need_x, need_conv)
        return None if grad_x is None else grad_x.to(x.dtype), grad_conv, grad_w, grad_b, None, None, None, None


_BITS = torch.arange(8, dtype=torch.uint8)


class ReluKeepingSign(torch.autograd.Function):
    """``relu(x)`` by the ReLU module (its hooks fire) that keeps one bit per element for backward, not its output:
    the gradient is ReLU's own (``threshold_backward``: zero where the output is <= 0), bitwise."""

    @staticmethod
    def forward(ctx: Any, relu: nn.Module, x: Tensor) -> Tensor:
        y = relu(x)
        if y is x:  # an in-place ReLU (torchvision's)
            ctx.mark_dirty(x)
        positive = ~(y <= 0).flatten()
        positive = F.pad(positive, (0, -positive.numel() % 8)).view(-1, 8).to(torch.uint8)
        ctx.save_for_backward((positive << _BITS.to(positive.device)).sum(1, dtype=torch.uint8))
        ctx.shape = y.shape
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor]:
        (packed,) = ctx.saved_tensors
        positive = ((packed.unsqueeze(1) >> _BITS.to(packed.device)) & 1).flatten()[:grad.numel()].bool()
        zero = torch.zeros((), dtype=grad.dtype, device=grad.device)
        return None, torch.where(positive.view(ctx.shape), grad, zero)
