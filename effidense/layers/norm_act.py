"""BatchNorm-ReLU for recomputed segments: statistics and running statistics stay exactly the plain model's.

The invariant: **a norm's running statistics are updated once per forward, however often its segment is recomputed,
and recomputation reproduces the first run's output bitwise.** Two ways keep it:

* Native (eager, not synchronised): :func:`prepare` does ``nn.BatchNorm2d``'s bookkeeping outside the segment
  (``num_batches_tracked``, the momentum factor) and hands the segment a :class:`OneShot`; inside, native
  ``F.batch_norm`` gets the running statistics on the segment's first run only, and a recomputation (checkpoint's
  rerun in backward) only normalises. Same kernels as ``nn.BatchNorm2d``, one op per norm: the plain model's host
  cost. torchvision and timm update running statistics again on every rerun (pytorch/pytorch#96136).
* Shared statistics (``nn.SyncBatchNorm`` under torch.distributed, and compiled code): batch statistics are computed
  once per feature map, outside any recomputed segment, cached per block and shared by every later norm (a
  channel's statistics are the same in every layer that normalises it); running statistics are updated there, once.
  Segments only normalise with the given statistics (:class:`BatchNormWithStats`, whose backward is native
  BatchNorm's training-mode backward, so gradients are the plain model's). Compiled code needs it because native
  ``batch_norm`` fixes the channel count in a graph and a rerun flag would break the graph at the checkpoint;
  synchronised norms because it runs each collective once per feature map.

``nn.SyncBatchNorm`` (``nn.SyncBatchNorm.convert_sync_batchnorm(model)``) works as it does elsewhere: in training,
with torch.distributed initialised and more than one process in the norm's group, batch statistics are those of
every process's batch (per-channel sums all-reduced: the global mean first, then squared deviations from it; ranks may
hold different batch sizes), running statistics use the global count, and backward all-reduces the per-channel
gradient sums as ``nn.SyncBatchNorm`` does (parameter gradients stay local sums, which DDP then averages). Forward
collectives run once per feature map, never in a recomputation (frugal's segments reuse their forward run's
statistics); backward ones once per norm. Unlike ``nn.SyncBatchNorm`` this also runs on CPU (gloo). Synchronised
norms are never compiled.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

__all__ = ["Stats", "SyncedStats", "OneShot", "BNReLUConv", "BatchNormWithStats", "SyncBatchNormWithStats",
           "batch_stats", "bn_relu", "inner_once", "prepare", "segment_stats", "shared_stats", "sync_group",
           "update_running_stats", "uses_batch_stats"]

Stats = tuple[Tensor, Tensor]  # per-channel mean and biased variance
# Statistics of a feature map over a process group (nn.SyncBatchNorm): mean, biased variance, the global number of
# values per channel (a tensor, so no host sync) and the group. A feature map's cache entry is Stats or this.
SyncedStats = tuple[Tensor, Tensor, Tensor, Any]


def normalize(x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, var: Tensor,
               eps: float) -> Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias, per channel. Half-precision affine parameters are used in the
    statistics' precision (float32), as cuDNN's BatchNorm keeps them."""
    weight, bias = _like_stats(weight, mean), _like_stats(bias, mean)
    if not torch.compiler.is_compiling():
        return torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps, torch.backends.cudnn.enabled)
    # Traced batch_norm fixes the channel count; this arithmetic keeps it symbolic and fuses just the same.
    scale = torch.rsqrt(var + eps)
    scale = scale if weight is None else scale * weight
    shift = -mean * scale if bias is None else bias - mean * scale
    return x * scale.view(1, -1, 1, 1).to(x.dtype) + shift.view(1, -1, 1, 1).to(x.dtype)


def _like_stats(param: Tensor | None, stats: Tensor) -> Tensor | None:
    return param if param is None or param.dtype == stats.dtype else param.to(stats.dtype)


class BatchNormWithStats(torch.autograd.Function):
    """Training-mode BatchNorm given its batch statistics: normalises only; backward is native BatchNorm's
    training-mode backward, which includes the gradient through the statistics."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, var: Tensor,
                eps: float) -> Tensor:
        ctx.eps = eps
        ctx.dtypes = tuple(None if t is None else t.dtype for t in (weight, bias))
        ctx.save_for_backward(x, _like_stats(weight, mean), mean, torch.rsqrt(var + eps))
        return normalize(x, weight, bias, mean, var, eps)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, mean, invstd = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
            grad, x, weight, None, None, mean, invstd, True, ctx.eps, list(ctx.needs_input_grad[:3]))
        grad_weight, grad_bias = (g if g is None else g.to(dtype) for g, dtype in zip((grad_weight, grad_bias),
                                                                                       ctx.dtypes, strict=True))
        return grad_x, grad_weight, grad_bias, None, None, None


class SyncBatchNormWithStats(torch.autograd.Function):
    """Training-mode BatchNorm given statistics synchronised over ``group``: normalises only; backward is
    ``nn.SyncBatchNorm``'s in plain torch ops (so it runs on any device and backend): the per-channel sums of the
    gradient through the statistics are all-reduced, the weight and bias gradients are this process's sums."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, var: Tensor,
                eps: float, group: Any) -> Tensor:
        ctx.group = group
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(x, weight, mean, torch.rsqrt(var + eps))
        return normalize(x, weight, bias, mean, var, eps)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, mean, invstd = ctx.saved_tensors
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        channel = (1, -1, 1, 1)
        grad = grad.to(mean.dtype)
        xhat = (x.to(mean.dtype) - mean.view(channel)) * invstd.view(channel)
        sum_dy = grad.sum((0, 2, 3))
        sum_dy_xhat = (grad * xhat).sum((0, 2, 3))
        grad_x = None
        if need_x:
            # Gradient through the statistics: sums over every process's batch, the count all-reduced with them.
            count = sum_dy.new_full((1,), x.numel() // x.size(1))
            combined = torch.cat([sum_dy, sum_dy_xhat, count])
            dist.all_reduce(combined, group=ctx.group)
            total_dy, total_dy_xhat, total = combined.split([sum_dy.numel(), sum_dy.numel(), 1])
            scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
            grad_x = (grad - (total_dy / total).view(channel) - xhat * (total_dy_xhat / total).view(channel))
            grad_x = (grad_x * scale.view(channel)).to(x.dtype)
        # Local sums, as nn.SyncBatchNorm's: DDP's gradient all-reduce combines them.
        grad_weight = sum_dy_xhat.to(weight.dtype) if weight is not None and need_weight else None
        grad_bias = sum_dy.to(ctx.bias_dtype) if ctx.bias_dtype is not None and need_bias else None
        return grad_x, grad_weight, grad_bias, None, None, None, None


def uses_batch_stats(norm: nn.BatchNorm2d) -> bool:
    return norm.training or not norm.track_running_stats


def sync_group(norm: nn.BatchNorm2d) -> Any:
    """The process group whose batch statistics ``norm`` normalises with, or None for this process's own:
    ``nn.SyncBatchNorm``'s rule (training, torch.distributed initialised, more than one process in its group)."""
    if not (isinstance(norm, nn.SyncBatchNorm) and norm.training and dist.is_available() and dist.is_initialized()):
        return None
    group = norm.process_group if norm.process_group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


@torch.no_grad()
def batch_stats(x: Tensor) -> Stats:
    """Per-channel mean and biased variance, two-pass (several times faster than Welford on CPU), in at least
    float32 precision."""
    count = x.numel() // x.size(1)
    if count < 2:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    mean = x.mean((0, 2, 3))
    var = (x - mean.view(1, -1, 1, 1)).square_().mean((0, 2, 3))
    return mean, var


@torch.no_grad()
def synced_batch_stats(x: Tensor, group: Any) -> SyncedStats:
    """Per-channel mean and biased variance over the batches of every process in ``group``, two-pass as in
    :func:`batch_stats`: the global mean from all-reduced sums and counts, then all-reduced squared deviations."""
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    sums = torch.cat([x.sum((0, 2, 3)), x.new_full((1,), x.numel() // x.size(1))])
    dist.all_reduce(sums, group=group)
    total, count = sums[:-1], sums[-1]
    mean = total / count
    squares = (x - mean.view(1, -1, 1, 1)).square_().sum((0, 2, 3))
    dist.all_reduce(squares, group=group)
    return mean, squares / count, count, group


def stats_group(entry: Stats | SyncedStats) -> Any:
    return entry[3] if len(entry) > 2 else None


def stats_count(entry: Stats | SyncedStats, local: int) -> int | Tensor:
    """Values per channel behind ``entry``: the global count of synced statistics, else ``local``."""
    return entry[2] if len(entry) > 2 else local


@torch.no_grad()
def update_running_stats(norm: nn.BatchNorm2d, stats: Stats, count: int | Tensor) -> None:
    """Update ``norm``'s running statistics with one batch's, as ``nn.BatchNorm2d`` would in training
    (``count``: values per channel, a tensor for synchronised statistics)."""
    if not (norm.training and norm.track_running_stats):
        return
    norm.num_batches_tracked.add_(1)
    factor = 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
    mean, var = stats
    norm.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
    norm.running_var.mul_(1 - factor).add_(var * (count / (count - 1)), alpha=factor)


def shared_stats(norm: nn.BatchNorm2d, features: Sequence[Tensor], shared: list[Stats | SyncedStats],
           track: bool = True) -> Stats:
    """The statistics ``norm`` normalises the concatenated ``features`` with.

    In training, batch statistics from ``shared`` (the per-feature-map cache of a block, filled here as needed;
    synchronised over the norm's process group for ``nn.SyncBatchNorm``) and the running statistics are updated
    once; in eval, the running statistics.
    """
    if not uses_batch_stats(norm):
        return norm.running_mean, norm.running_var
    group = sync_group(norm)
    if shared and stats_group(shared[0]) is not group:
        shared = []  # cached for norms synchronised otherwise (or not at all): this norm's statistics are its own
    for t in features[len(shared):]:
        shared.append(batch_stats(t) if group is None else synced_batch_stats(t, group))
    used = shared[:len(features)]
    mean, var = torch.cat([s[0] for s in used]), torch.cat([s[1] for s in used])
    if track:
        update_running_stats(norm, (mean, var), stats_count(used[0], features[0].numel() // features[0].size(1)))
    return mean, var


class OneShot:
    """Native training-mode BatchNorm in a segment that may run again: the first run updates the running statistics
    (with ``factor``, nn.BatchNorm2d's momentum), a rerun only normalises."""

    __slots__ = ("factor", "pending")

    def __init__(self, factor: float) -> None:
        self.factor = factor
        self.pending = True

    def take(self) -> bool:
        """True on the first call only."""
        pending, self.pending = self.pending, False
        return pending


def _native(norm: nn.BatchNorm2d, compiled: Any) -> bool:
    return compiled is None and not torch.compiler.is_compiling() and sync_group(norm) is None


def _count_batch(norm: nn.BatchNorm2d) -> float:
    """nn.BatchNorm2d's bookkeeping before a training forward; returns the running statistics' update factor."""
    if not (norm.training and norm.track_running_stats):
        return 0.0
    norm.num_batches_tracked.add_(1)
    return 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum


def prepare(norm: nn.BatchNorm2d, features: Sequence[Tensor], shared: list[Stats | SyncedStats],
            compiled: Any = None) -> tuple[Tensor | None, Tensor | None, OneShot | None]:
    """What a segment needs to normalise the concatenated ``features`` with ``norm``, prepared outside it:
    ``(None, None, OneShot)`` for native BatchNorm, else the statistics ``(mean, var, None)`` (see the module
    docstring; ``shared`` is the block's per-feature-map cache, ``compiled`` the segment's compile options)."""
    if uses_batch_stats(norm) and _native(norm, compiled):
        return None, None, OneShot(_count_batch(norm))
    mean, var = shared_stats(norm, features, shared)
    return mean, var, None


def inner_once(norm: nn.BatchNorm2d, compiled: Any = None) -> OneShot | None:
    """For a norm whose input is made inside a recomputed segment (frugal): its :class:`OneShot`, prepared outside
    the segment, or None when the segment uses :func:`segment_stats`."""
    return OneShot(_count_batch(norm)) if uses_batch_stats(norm) and _native(norm, compiled) else None


def segment_stats(norm: nn.BatchNorm2d, x: Tensor, cache: list[SyncedStats]) -> tuple[Stats, int | Tensor]:
    """Untracked statistics of ``norm`` for map ``x`` inside a recomputed segment, and the count to track them with.

    ``cache`` is a list from outside the segment: the forward run fills it and the recomputation reuses it, so backward
    neither recomputes the statistics nor runs a collective. Under torch.compile, statistics that need no collective
    are recomputed instead (bitwise the same): mutating an outside list would break the graph at the checkpoint.
    """
    synced = sync_group(norm) is not None
    shared = cache if synced or not torch.compiler.is_compiling() else []
    stats = shared_stats(norm, [x], shared, track=False)
    local = x.numel() // x.size(1)
    return stats, stats_count(shared[0], local) if synced else local


def normalize_relu(x: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, var: Tensor, eps: float,
                    batch_stats: bool) -> Tensor:
    if batch_stats:
        x = BatchNormWithStats.apply(x, weight, bias, mean, var, eps)
    else:
        x = normalize(x, weight, bias, mean, var, eps)
    return F.relu(x, inplace=True)


@functools.cache
def compiled_normalize_relu(options: tuple[tuple[str, Any], ...]) -> Callable[..., Tensor]:
    # One graph serves every layer: channel counts and sizes are symbolic, so depth does not multiply compile time.
    return torch.compile(normalize_relu, dynamic=True, fullgraph=True, **dict(options))


def bn_relu(norm: nn.BatchNorm2d, x: Tensor, mean: Tensor | None, var: Tensor | None,
            compiled: tuple[tuple[str, Any], ...] | None = None, once: OneShot | None = None) -> Tensor:
    """ReLU(BN(x)): native BatchNorm under ``once`` (see :class:`OneShot`), else with the given statistics;
    ``compiled`` holds torch.compile options, or None for eager. Synchronised norms always run eagerly: their
    backward holds a collective."""
    if once is not None:
        running_mean, running_var = norm.running_mean, norm.running_var
        if not once.take() and running_mean is not None:
            # A rerun updates throwaway copies: it must save the same tensors as the first run for checkpoint.
            running_mean, running_var = torch.zeros_like(running_mean), torch.ones_like(running_var)
        x = F.batch_norm(x, running_mean, running_var, norm.weight, norm.bias, True, once.factor, norm.eps)
        return F.relu(x, inplace=True)
    group = sync_group(norm)
    if group is not None:
        return F.relu(SyncBatchNormWithStats.apply(x, norm.weight, norm.bias, mean, var, norm.eps, group),
                      inplace=True)
    if compiled is None:
        return normalize_relu(x, norm.weight, norm.bias, mean, var, norm.eps, uses_batch_stats(norm))
    # Dynamo gives parameters static shapes; plain views let one graph serve every channel count.
    weight, bias = (None if t is None else t.view(-1) for t in (norm.weight, norm.bias))
    return compiled_normalize_relu(compiled)(x, weight, bias, mean, var, norm.eps, uses_batch_stats(norm))


class BNReLUConv(torch.autograd.Function):
    """``conv(ReLU(BN(x)))`` for native BatchNorm that keeps only ``x`` for backward: the light recompute of a dense
    layer's bottleneck (efficient mode), one fewer ``torch.utils.checkpoint`` per layer.

    Backward rebuilds ``ReLU(BN(x))`` (never the convolution) and calls the kernels autograd calls for the plain model:
    ``convolution_backward`` on the input autocast gave the convolution, ReLU's ``threshold_backward``, and the
    backward of whichever BatchNorm implementation ran (``_batch_norm_impl_index``: native or cuDNN), so gradients are
    bitwise the plain model's. BatchNorm and ReLU have no autocast policy, so only the convolution's casts are redone.
    The running statistics are updated in forward only, as :class:`OneShot` says.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, bn_weight: Tensor | None, bn_bias: Tensor | None, conv_weight: Tensor,
                norm: nn.BatchNorm2d, conv: nn.Conv2d, once: OneShot) -> Tensor:
        device = x.device.type
        ctx.norm, ctx.conv = norm, conv
        ctx.autocast = torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)
        ctx.save_for_backward(x)
        return conv(bn_relu(norm, x, None, None, None, once))

    @staticmethod
    @once_differentiable  # double backward through it raises instead of going silently wrong
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        (x,) = ctx.saved_tensors
        norm, conv = ctx.norm, ctx.conv
        enabled, dtype = ctx.autocast
        need_x, need_w, need_b, need_conv = ctx.needs_input_grad[:4]
        weight, bias = norm.weight, norm.bias
        y, save_mean, save_invstd, reserve, impl = torch._batch_norm_impl_index(
            x, weight, bias, None, None, True, 0.0, norm.eps, torch.backends.cudnn.enabled)
        z = y.relu_()

        def as_conv_sees(t: Tensor) -> Tensor:  # autocast casts a convolution's floating inputs to its dtype
            return t.to(dtype) if enabled and t.is_floating_point() and t.dtype != dtype else t

        grad_z, grad_conv, _ = torch.ops.aten.convolution_backward(
            grad, as_conv_sees(z), as_conv_sees(conv.weight), None, list(conv.stride), list(conv.padding),
            list(conv.dilation), False, [0] * len(conv.stride), conv.groups, [True, need_conv, False])
        grad_y = torch.ops.aten.threshold_backward(grad_z.to(z.dtype), z, 0)
        grad_x, grad_w, grad_b = torch.ops.aten._batch_norm_impl_index_backward(
            impl, x, grad_y, weight, None, None, save_mean, save_invstd, True, norm.eps, [need_x, need_w, need_b],
            reserve)
        grad_conv = None if grad_conv is None else grad_conv.to(conv.weight.dtype)
        return grad_x, grad_w, grad_b, grad_conv, None, None, None
