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


class NormReluConv(torch.autograd.Function):
    """``conv(relu(norm(*maps)))`` for native training-mode BatchNorm that keeps only ``maps`` for backward (they are
    kept anyway: earlier layers' outputs, or a bottleneck's). Forward calls the three modules (their hooks see what
    they would see without it); the norm concatenates the maps.

    Backward rebuilds ``ReLU(BN(cat(maps)))`` (never the convolution) and calls the kernels autograd calls for the
    plain model: ``convolution_backward`` on the input autocast gave the convolution, ReLU's ``threshold_backward``
    (in place, into the convolution's input gradient, where the layouts agree), the backward of whichever BatchNorm
    implementation ran (``_batch_norm_impl_index``: native or cuDNN), and the concatenation's (views of the
    gradient, one per map), so gradients are bitwise the plain model's. Each map is dropped once the kernels are
    done with it: at most three of the concatenation's size are alive at once, where a checkpoint's rerun holds
    four. BatchNorm and ReLU have no autocast policy, so only the convolution's casts are redone. Running statistics
    are updated in forward only. Under ``create_graph=True`` backward differentiates a rerun instead
    (:func:`differentiable_rerun`), so a second backward works.
    """

    @staticmethod
    def forward(ctx: Any, norm: nn.Module, relu: nn.ReLU, conv: nn.Module, bn_weight: Tensor | None,
                bn_bias: Tensor | None, conv_weight: Tensor, *maps: Tensor) -> Tensor:
        device = maps[0].device.type
        ctx.modules = norm, relu, conv
        ctx.autocast = torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)
        ctx.save_for_backward(*maps)
        return conv(relu(norm(*maps)))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        maps = ctx.saved_tensors
        norm, relu, conv = ctx.modules
        if torch.is_grad_enabled():
            return differentiable_rerun(ctx, grad, lambda *t: conv(relu(norm(*t))),
                                         (None, None, None, norm.weight, norm.bias, conv.weight), maps)
        need_w, need_b, need_conv = ctx.needs_input_grad[3:6]
        need_maps = ctx.needs_input_grad[6:]
        x = maps[0] if len(maps) == 1 else torch.cat(maps, 1)
        y, bn_saved = _batch_norm_relu(norm, x)
        grad_y, grad_conv = _conv_backward(ctx, conv, grad, y, True, need_conv)
        grad_y = grad_y.to(y.dtype)
        grad_y = _relu_backward(grad_y, y)
        del y
        grad_x, grad_w, grad_b = _batch_norm_backward(norm, x, grad_y, bn_saved, [any(need_maps), need_w, need_b])
        del x, grad_y
        if grad_x is None:
            grad_maps: tuple[Tensor | None, ...] = (None,) * len(maps)
        else:  # the concatenation's backward: a view of the gradient per map
            grad_maps = tuple(g if need else None for g, need in zip(
                grad_x.split([m.shape[1] for m in maps], 1), need_maps, strict=True))
        return None, None, None, grad_w, grad_b, grad_conv, *grad_maps


def _batch_norm_relu(norm: nn.Module, x: Tensor) -> tuple[Tensor, tuple[Any, ...]]:
    """``ReLU(BN(x))`` with batch statistics and no running statistics, by the kernel ``F.batch_norm`` picks (native or
    cuDNN), and what its backward needs. BatchNorm and ReLU have no autocast policy: they run as forward ran them."""
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
    """ReLU's backward (``threshold_backward``), written into ``grad`` (the backward's own buffer) where that gives
    the layout autograd's would, i.e. where the strides agree. Otherwise (1x1 maps under channels_last, whose strides
    are ambiguous) it is made anew, as autograd makes it: BatchNorm's backward then sees the same layout, and gives
    the same bits."""
    if grad.stride() != y.stride():
        return torch.ops.aten.threshold_backward(grad, y, 0)
    return torch.ops.aten.threshold_backward.grad_input(grad, y, 0, grad_input=grad)


def _conv_backward(ctx: Any, conv: nn.Module, grad: Tensor, x: Tensor, need_x: bool,
                   need_weight: bool) -> tuple[Tensor | None, Tensor | None]:
    """``convolution_backward`` as autograd runs it for ``conv(x)`` under the autocast state forward ran in: on the
    inputs autocast gave the convolution, with the weight's gradient in the weight's dtype."""
    enabled, dtype = ctx.autocast

    def as_conv_sees(t: Tensor) -> Tensor:  # autocast casts a convolution's floating inputs to its dtype
        return t.to(dtype) if enabled and t.is_floating_point() and t.dtype != dtype else t

    grad_x, grad_weight, _ = torch.ops.aten.convolution_backward(
        grad, as_conv_sees(x), as_conv_sees(conv.weight), None, list(conv.stride), list(conv.padding),
        list(conv.dilation), False, [0] * len(conv.stride), conv.groups, [need_x, need_weight, False])
    return grad_x, None if grad_weight is None else grad_weight.to(conv.weight.dtype)


def differentiable_rerun(ctx: Any, grad: Tensor, run: Callable[..., Tensor], before: tuple[Tensor | None, ...],
                          maps: tuple[Tensor, ...], after: tuple[Tensor | None, ...] = ()) -> tuple[Tensor | None, ...]:
    """A Function's gradients under ``create_graph=True``: those of ``run(*maps)``, a rerun of its forward (under the
    autocast state forward ran in, updating no running statistics), with a graph of their own, as a checkpoint
    computes them; so a second backward (a gradient penalty) works. ``apply`` took ``before``, ``maps``, ``after``.

    The rerun reads each map through a view: gradients are taken at the views, so where one map was computed from
    another (a block's), neither picks up the other's path, which the outer backward follows anyway."""
    needs = ctx.needs_input_grad
    views = tuple(m.view_as(m) for m in maps)
    enabled, dtype = ctx.autocast
    with rerun(), torch.autocast(grad.device.type, dtype=dtype, enabled=enabled):
        out = run(*views)
    inputs = (*before, *views, *after)
    wanted = [t for t, need in zip(inputs, needs, strict=False) if need]
    grads = iter(torch.autograd.grad(out, wanted, grad, create_graph=True, allow_unused=True))
    return tuple(next(grads) if need else None for need in needs)


def plain_conv(conv: nn.Module) -> bool:
    """A convolution :class:`ConvNormReluPool` can differentiate by hand: no bias, zero padding given in numbers."""
    return isinstance(conv, nn.modules.conv._ConvNd) and not conv.transposed and conv.bias is None \
        and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple)


class ConvNormReluPool(torch.autograd.Function):
    """``pool(relu(norm(conv(x))))`` for native training-mode BatchNorm that keeps only ``x`` for backward.

    Forward calls the four modules (their hooks see what they would see without it). Backward reruns the convolution
    (under the autocast state forward ran in) and ``ReLU(BN(.))``, then calls the kernels autograd calls for the
    plain model, as :class:`NormReluConv` does: the pool's backward (argmax recomputed), ReLU's
    ``threshold_backward`` (in place, into the pool's gradient, where the layouts agree), BatchNorm's backward and
    ``convolution_backward``. Each map is dropped once the kernels are done with it, so at most three maps of the
    convolution's size are alive at once, where a checkpoint's rerun holds four and a spare: gradients are bitwise
    the plain model's. Running statistics are updated in forward only. Under ``create_graph=True`` backward
    differentiates a rerun instead (:func:`differentiable_rerun`), so a second backward works.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, conv_weight: Tensor, bn_weight: Tensor | None, bn_bias: Tensor | None,
                conv: nn.Module, norm: nn.Module, relu: nn.ReLU, pool: MaxPool) -> Tensor:
        device = x.device.type
        ctx.modules = conv, norm, relu, pool
        ctx.autocast = torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)
        ctx.save_for_backward(x)
        return pool(relu(norm(conv(x))))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        (x,) = ctx.saved_tensors
        conv, norm, relu, pool = ctx.modules
        if torch.is_grad_enabled():
            return differentiable_rerun(ctx, grad, lambda t: pool(relu(norm(conv(t)))),
                                         (), (x,), (conv.weight, norm.weight, norm.bias))
        enabled, dtype = ctx.autocast
        need_x, need_conv, need_w, need_b = ctx.needs_input_grad[:4]
        with torch.autocast(x.device.type, dtype=dtype, enabled=enabled):
            c = conv._conv_forward(x, conv.weight, None)
        y, bn_saved = _batch_norm_relu(norm, c)
        grad_y = pool.input_grad(y, grad)
        grad_y = _relu_backward(grad_y, y)
        del y
        grad_c, grad_w, grad_b = _batch_norm_backward(norm, c, grad_y, bn_saved, [True, need_w, need_b])
        del c, grad_y
        grad_x, grad_conv = _conv_backward(ctx, conv, grad_c, x, need_x, need_conv)
        grad_x = None if grad_x is None else grad_x.to(x.dtype)
        return grad_x, grad_conv, grad_w, grad_b, None, None, None, None


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
