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

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .norm import BatchNormAct, grad_sums, input_grad
from .pool import MaxPool
from .recompute import checkpointed, is_tracing, rerun

__all__ = ["ConvNormReluPool", "NormReluConv", "ReluKeepingSign", "SlicedChain", "concat_norm_conv", "conv_norm_pool",
           "differentiable_rerun", "plain_conv", "slice_count"]

SLICE_FLOOR = 32 * 2 ** 20  # bytes: a smaller rerun costs little memory, and slicing it would cost kernel launches


def _light(norm: nn.Module, act: nn.Module, conv: nn.Module) -> bool:
    """Whether ``norm``, ``act`` and ``conv`` can rerun in a light Function: native training-mode BatchNorm, ReLU, a
    convolution differentiated by hand (or a max-pool), autograd recording and nobody tracing."""
    return isinstance(norm, BatchNormAct) and norm.act is None and type(act) is nn.ReLU and \
        (plain_conv(conv) or isinstance(conv, MaxPool)) and torch.is_grad_enabled() and not is_tracing() and \
        norm.native_training()


def slice_count(setting: int | str | None, frugal: bool, batch: int, transient: float, reads: float) -> int:
    """How many slices of the batch a rerun's backward goes through: ``setting`` (a count, at most the batch), or for
    'auto' in frugal mode, where the rerun would hold more than :data:`SLICE_FLOOR` (``transient`` bytes for the
    whole batch), as many as keep a slice's maps within a quarter of what the rerun reads (``reads``), which frugal
    keeps anyway. Once a rerun is sliced, more slices cost no arithmetic, only kernel launches."""
    if setting == "auto":
        setting = math.ceil(4 * transient / reads) if frugal and transient > SLICE_FLOOR and reads else 1
    return 1 if setting is None else max(1, min(setting, batch))


def run_sliced(stages: Sequence[tuple[nn.Module, nn.Module, nn.Module]], *maps: Tensor, slices: int,
               pre: nn.Module | None = None) -> Tensor | None:
    """``stages`` (norm, ReLU, convolution or max-pool) run in turn on the concatenated ``maps`` (or on ``pre`` of
    the one map), through :class:`SlicedChain` when ``slices`` > 1 and every norm can rerun light and has no hooks
    (which fire only if the norm is called); None where it cannot."""
    if slices < 2 or not all(_light(*stage) and not stage[0]._forward_hooks and not stage[0]._forward_pre_hooks
                             for stage in stages):
        return None
    params = [] if pre is None else [pre.weight]
    for norm, _, post in stages:
        params += [norm.weight, norm.bias, post.weight if isinstance(post, nn.modules.conv._ConvNd) else None]
    return SlicedChain.apply(slices, pre, tuple(stages), len(params), *params, *maps)


def concat_norm_conv(norm: nn.Module, act: nn.Module, conv: nn.Module, *maps: Tensor, light: bool,
                     slices: int = 1) -> Tensor:
    """``conv(act(norm(*maps)))``; when ``light``, keeping only ``maps`` for backward, whose backward goes through the
    batch in ``slices``."""
    if not light:
        return conv(act(norm(*maps)))
    out = run_sliced([(norm, act, conv)], *maps, slices=slices)
    if out is not None:
        return out
    if _light(norm, act, conv):
        return NormReluConv.apply(norm, act, conv, norm.weight, norm.bias, conv.weight, *maps)
    return checkpointed(True, lambda *t: conv(act(norm(*t))), *maps)


def conv_norm_pool(conv: nn.Module, norm: nn.Module, act: nn.Module, pool: nn.Module, x: Tensor,
                   slices: int = 1) -> Tensor:
    """``pool(act(norm(conv(x))))``, keeping only ``x`` for backward, whose backward goes through ``slices``."""
    out = run_sliced([(norm, act, pool)], x, slices=slices, pre=conv) if plain_conv(conv) else None
    if out is not None:
        return out
    if isinstance(pool, MaxPool) and _light(norm, act, conv):
        return ConvNormReluPool.apply(x, conv.weight, norm.weight, norm.bias, conv, norm, act, pool)
    return checkpointed(True, lambda t: pool(act(norm(conv(t)))), x)


def _run_chain(pre: nn.Module | None, stages: Sequence[tuple[nn.Module, ...]], *maps: Tensor) -> Tensor:
    x = pre(maps[0]) if pre is not None else maps
    for norm, act, post in stages:
        x = post(act(norm(*x) if isinstance(x, tuple) else norm(x)))
    return x


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


class SlicedChain(_Light):
    """One or two stages (BatchNorm, ReLU, then a convolution or max-pool) in turn on the concatenated maps, or on
    ``pre`` (a convolution) of the one map, keeping only the maps and each norm's batch statistics (two values per
    channel). Forward is the plain model's, by the same kernels: outputs and running statistics are bitwise equal.

    Backward goes through the batch in ``slices``, rebuilding each slice's maps from the saved statistics, so that it
    holds a slice's maps rather than the batch's. A BatchNorm couples the samples through two per-channel sums of its
    gradients, so each norm takes a sweep to sum them before any input gradient can be formed: with two stages, the
    first sweep sums the second norm's, keeping that norm's input and gradient (the bottleneck's width, not the
    concatenation's); the next sums the first norm's; the last forms each slice's input gradient. Weight gradients
    are summed slice by slice, so gradients equal the plain model's up to the order of floating-point sums. Under
    ``create_graph=True`` backward differentiates a whole-batch rerun instead.
    """

    @staticmethod
    def forward(ctx: Any, slices: int, pre: nn.Module | None, stages: tuple, n_params: int, *tensors: Tensor) -> Tensor:
        maps = tensors[n_params:]
        _Light.setup(ctx, maps[0], pre, stages)
        x, stats = pre(maps[0]) if pre is not None else torch.cat(maps, 1) if len(maps) > 1 else maps[0], []
        for norm, act, post in stages:  # F.batch_norm's very kernel, with its statistics
            y, mean, invstd, _, _ = torch._batch_norm_impl_index(
                x, norm.weight, norm.bias, norm.running_mean, norm.running_var, True, norm.count_batch(), norm.eps,
                torch.backends.cudnn.enabled)
            stats.append((mean, invstd))
            x = post(act(y))
        ctx.slices, ctx.n_params, ctx.stats = slices, n_params, stats
        ctx.save_for_backward(*maps)
        return x

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        (pre, stages), maps = ctx.modules, ctx.saved_tensors
        weights = [] if pre is None else [pre.weight]
        for norm, _, post in stages:
            weights += [norm.weight, norm.bias, getattr(post, "weight", None)]
        if torch.is_grad_enabled():
            return differentiable_rerun(ctx, grad, lambda *t: _run_chain(pre, stages, *t),
                                        (None, None, None, None, *weights), maps)
        needs = ctx.needs_input_grad
        grads = {id(w): None for w, need in zip(weights, needs[4:], strict=False) if w is not None and need}
        grad_maps = [torch.empty_like(t) if need else None for t, need in zip(maps, needs[4 + ctx.n_params:],
                                                                              strict=True)]
        parts, batch = _bounds(grad.shape[0], ctx.slices), grad.shape[0]

        def accumulate(weight: Tensor, g: Tensor | None) -> None:
            if g is not None:
                grads[id(weight)] = g if grads[id(weight)] is None else grads[id(weight)].add_(g)

        def conv(module: nn.Module, x: Tensor) -> Tensor:  # as forward ran it, without calling its hooks again
            with torch.autocast(grad.device.type, dtype=ctx.autocast[1], enabled=ctx.autocast[0]):
                return module._conv_forward(x, module.weight, None)

        def front(a: int, b: int) -> tuple[Tensor, Tensor]:  # a slice's chain input and first normalised map
            x = conv(pre, maps[0][a:b]) if pre is not None else torch.cat([t[a:b] for t in maps], 1)
            return x, _normalize_relu(x, stages[0][0], *ctx.stats[0])

        def through(stage: tuple, g: Tensor, y: Tensor, weight: bool) -> Tensor:  # a stage's post, then its ReLU
            post = stage[2]
            if isinstance(post, MaxPool):
                g = post.input_grad(y, g)
            else:
                g, grad_w = _conv_backward(ctx, post, g, y, True, weight and id(post.weight) in grads)
                accumulate(post.weight, grad_w)
            return torch.ops.aten.threshold_backward(g.to(y.dtype), y, 0)

        def summed(stage: int, gz: Tensor, x: Tensor, total: list) -> None:
            sums = grad_sums(gz, x, *ctx.stats[stage])
            total[:] = sums if not total else [t + s for t, s in zip(total, sums, strict=True)]

        top, totals = grad, [[] for _ in stages]
        if len(stages) == 2:  # the second norm's sums, keeping its input and gradient, then that input's gradient
            inputs, top = None, None
            for a, b in parts:
                x1 = conv(stages[0][2], front(a, b)[1])
                y1 = _normalize_relu(x1, stages[1][0], *ctx.stats[1])
                gz1 = through(stages[1], grad[a:b], y1, True)
                summed(1, gz1, x1, totals[1])
                if top is None:
                    inputs, top = x1.new_empty((batch, *x1.shape[1:])), gz1.new_empty((batch, *gz1.shape[1:]))
                inputs[a:b], top[a:b] = x1, gz1
            count = batch * math.prod(inputs.shape[2:])
            for a, b in parts:
                top[a:b] = input_grad(top[a:b], inputs[a:b], *ctx.stats[1], stages[1][0].weight, *totals[1], count)
            del inputs
        for a, b in parts:  # the first norm's sums
            x, y = front(a, b)
            summed(0, through(stages[0], top[a:b], y, True), x, totals[0])
        count = batch * math.prod(x.shape[2:])
        for a, b in parts:  # each slice's input gradient
            x, y = front(a, b)
            g = input_grad(through(stages[0], top[a:b], y, False), x, *ctx.stats[0], stages[0][0].weight,
                           *totals[0], count)
            if pre is not None:
                g, grad_w = _conv_backward(ctx, pre, g, maps[0][a:b], grad_maps[0] is not None, id(pre.weight) in grads)
                accumulate(pre.weight, grad_w)
                if grad_maps[0] is not None:
                    grad_maps[0][a:b] = g
                continue
            for t, part in zip(grad_maps, g.split([t.shape[1] for t in maps], 1), strict=True):
                if t is not None:
                    t[a:b] = part
        for (norm, _, _), (total_dy, total_dy_xhat) in zip(stages, totals, strict=True):
            for param, total in ((norm.weight, total_dy_xhat), (norm.bias, total_dy)):
                if param is not None and id(param) in grads:
                    grads[id(param)] = total.to(param.dtype)
        return None, None, None, None, *[None if w is None else grads.get(id(w)) for w in weights], *grad_maps


def _bounds(batch: int, slices: int) -> list[tuple[int, int]]:
    """``slices`` consecutive parts of the batch, as equal as can be (as ``tensor_split``)."""
    size, extra = divmod(batch, min(slices, batch))
    starts = [i * size + min(i, extra) for i in range(min(slices, batch) + 1)]
    return list(zip(starts, starts[1:], strict=False))


def _normalize_relu(x: Tensor, norm: nn.Module, mean: Tensor, invstd: Tensor) -> Tensor:
    """``ReLU(BN(x))`` with the statistics forward saved, in their precision, as the kernels compute it."""
    shape = (1, -1, *([1] * (x.dim() - 2)))
    scale = invstd if norm.weight is None else invstd * norm.weight.to(invstd.dtype)
    y = (x.to(mean.dtype) - mean.view(shape)) * scale.view(shape)
    if norm.bias is not None:
        y = y + norm.bias.to(mean.dtype).view(shape)
    return y.relu_().to(x.dtype)


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
