"""BatchNorm(+ReLU) that stays exact when the segment it runs in is recomputed.

**The rule: running statistics are updated on a segment's first run only, and a rerun reproduces that run bitwise.**
torchvision and timm update them again on every rerun (pytorch/pytorch#96136); :class:`BatchNormAct` never does.

How each path keeps the rule (:meth:`BatchNormAct.forward`):

* Native (not synchronised): ``F.batch_norm`` with the running buffers on the first run; a rerun
  (:func:`~effidense.layers.recompute.recomputing`) hands it throwaway copies, so it saves the same tensors and
  normalises bitwise alike. Same kernels as ``nn.BatchNorm2d``, one op per norm. Under ``torch.compile`` of the whole
  model this path is traced as it is: the compiled graph applies buffer updates once, however it recomputes.
* Synchronised (``nn.SyncBatchNorm`` under torch.distributed): batch statistics are computed on the first run, with
  their collectives, and kept in a ``cache`` handed in from outside the segment, one entry per feature map; a rerun
  reuses them, so it runs no collective and no statistics. A block shares one cache between its norms, since a
  channel's statistics are the same in every layer that normalises it: a synchronised model runs its forward
  collectives once per feature map. Normalising with given statistics backpropagates through them
  (:class:`SyncBatchNormWithStats`, ``nn.SyncBatchNorm``'s backward, on any device and backend).

``nn.SyncBatchNorm.convert_sync_batchnorm(model)`` works as it does elsewhere: the dense layers, transitions and the
model's ``features`` adopt the ``nn.SyncBatchNorm`` it puts in place of a norm (:class:`AdoptsNorms`), keeping its
parameters, buffers and process group. In training under torch.distributed with more than one process in the group,
statistics are those of every process's batch (ranks may hold different batch sizes) and backward all-reduces the
per-channel gradient sums. Unlike torch's SyncBatchNorm this also runs on CPU.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .light import ConvNormReluPool, NormReluConv, plain_conv
from .pool import MaxPool
from .recompute import checkpointed, fx_leaf, is_tracing, recomputing

__all__ = ["BATCH_NORM_ACT", "INSTANCE_NORM_ACT", "Activation", "AdoptsNorms", "BatchNormAct", "BatchNormAct1d",
           "BatchNormAct2d", "BatchNormAct3d", "GroupNormAct", "InstanceNormAct1d", "InstanceNormAct2d",
           "InstanceNormAct3d", "NormAct", "SyncBatchNormAct", "SyncBatchNormWithStats", "batch_stats", "relu_"]

# Per-channel mean and biased variance, the values per channel behind them, and the process group (None: local).
Stats = tuple[Tensor, Tensor, Any, Any]


def _channel_view(t: Tensor, dims: int) -> Tensor:
    return t.view(1, -1, *([1] * (dims - 2)))


def _reduced(x: Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _like_stats(param: Tensor | None, stats: Tensor) -> Tensor | None:
    return param if param is None or param.dtype == stats.dtype else param.to(stats.dtype)


def normalize(x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, var: Tensor,
              eps: float) -> Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias, per channel. Half-precision affine parameters are used in the
    statistics' precision (float32), as cuDNN's BatchNorm keeps them."""
    weight, bias = _like_stats(weight, mean), _like_stats(bias, mean)
    return torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps, torch.backends.cudnn.enabled)


class SyncBatchNormWithStats(torch.autograd.Function):
    """Training-mode BatchNorm given statistics synchronised over ``group``: normalises only; backward is
    ``nn.SyncBatchNorm``'s in plain torch ops: the per-channel sums of the gradient through the statistics are
    all-reduced, the weight and bias gradients are this process's sums (DDP's gradient all-reduce combines them)."""

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
        grad = grad.to(mean.dtype)
        xhat = (x.to(mean.dtype) - _channel_view(mean, x.dim())) * _channel_view(invstd, x.dim())
        sum_dy = grad.sum(_reduced(x))
        sum_dy_xhat = (grad * xhat).sum(_reduced(x))
        grad_x = None
        if need_x:
            count = sum_dy.new_full((1,), x.numel() // x.size(1))
            combined = torch.cat([sum_dy, sum_dy_xhat, count])
            dist.all_reduce(combined, group=ctx.group)
            total_dy, total_dy_xhat, total = combined.split([sum_dy.numel(), sum_dy.numel(), 1])
            scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
            grad_x = grad - _channel_view(total_dy / total, x.dim()) - xhat * _channel_view(total_dy_xhat / total,
                                                                                             x.dim())
            grad_x = (grad_x * _channel_view(scale, x.dim())).to(x.dtype)
        grad_weight = sum_dy_xhat.to(weight.dtype) if weight is not None and need_weight else None
        grad_bias = sum_dy.to(ctx.bias_dtype) if ctx.bias_dtype is not None and need_bias else None
        return grad_x, grad_weight, grad_bias, None, None, None, None


@torch.no_grad()
def batch_stats(x: Tensor, group: Any = None) -> Stats:
    """Per-channel mean and biased variance of ``x``, two-pass (several times faster than Welford on CPU), in at least
    float32 precision; over the batches of every process in ``group`` when one is given (the global mean from
    all-reduced sums and counts, then all-reduced squared deviations)."""
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    dims = _reduced(x)
    if group is None:
        count = x.numel() // x.size(1)
        if count < 2:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
        mean = x.mean(dims)
        return mean, (x - _channel_view(mean, x.dim())).square_().mean(dims), count, None
    sums = torch.cat([x.sum(dims), x.new_full((1,), x.numel() // x.size(1))])
    dist.all_reduce(sums, group=group)
    count = sums[-1]
    mean = sums[:-1] / count
    squares = (x - _channel_view(mean, x.dim())).square_().sum(dims)
    dist.all_reduce(squares, group=group)
    return mean, squares / count, count, group


def relu_(x: Tensor) -> Tensor:
    """In-place ReLU, the default activation: a norm's output is its own, so overwriting it is safe."""
    return F.relu(x, inplace=True)


class Activation(nn.Module):
    """An activation function as a module of its own (``relu1``, MONAI's ``class_layers.relu``): what
    :meth:`NormAct.take_act` makes of a function that is not ReLU. One node under ``torch.fx``, as torch.nn's
    activations are."""

    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        node = fx_leaf(self, x)
        return self.fn(x) if node is None else node

    def extra_repr(self) -> str:
        return getattr(self.fn, "__name__", repr(self.fn))


class NormAct(nn.Module):
    """A norm, then its activation ``act`` (a function; default in-place ReLU, None for none), on the concatenation of
    the maps it is given: a base to mix with a norm class, as in ``class InstanceNormAct3d(NormAct,
    nn.InstanceNorm3d)``. A DenseNet's layers take the activation out as a module of their own (:meth:`take_act`),
    so that ``norm1`` means what torchvision's does and ``relu1`` follows it.

    ``forward(*maps, cache=None)`` concatenates ``maps`` along channels inside the norm, so inside the segment, and a
    recomputation rebuilds the concatenation rather than keeping it. ``cache`` is a list from outside the segment,
    shared by norms that normalise the same leading maps (a block's); only :class:`BatchNormAct` uses it. Norms with no
    running statistics (instance and group norm) are exact under recomputation by nature. Under ``torch.fx`` a norm is
    one leaf node, which runs this forward. State-dict keys are the norm class's.
    """

    def __init__(self, *args: Any, act: Callable[[Tensor], Tensor] | None = relu_, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if getattr(self, "track_running_stats", False) and not isinstance(self, BatchNormAct):
            raise ValueError(f"{type(self).__name__} with track_running_stats=True would update its running "
                             "statistics on every recomputation; only BatchNorm keeps them exact here")
        self.act = act

    def extra_repr(self) -> str:
        act = "" if self.act is relu_ else f", act={getattr(self.act, '__name__', self.act)}"
        return super().extra_repr() + act

    def take_act(self) -> nn.Module:
        """This norm's activation as a module, which from now on follows the norm instead of running inside it:
        ``nn.ReLU(inplace=True)`` for the default (torchvision's ``relu1``), ``nn.Identity()`` for none, the module
        itself if ``act`` is one, an :class:`Activation` otherwise."""
        act, self.act = self.act, None
        if act is relu_:
            return nn.ReLU(inplace=True)
        if act is None:
            return nn.Identity()
        return act if isinstance(act, nn.Module) else Activation(act)

    def forward(self, *maps: Tensor, cache: list[Stats] | None = None) -> Tensor:
        node = fx_leaf(self, *maps)
        if node is not None:
            return node
        return self._norm_act(maps[0] if len(maps) == 1 else torch.cat(maps, 1), maps, cache)

    def _act(self, x: Tensor) -> Tensor:
        return x if self.act is None else self.act(x)

    def _norm_act(self, x: Tensor, maps: tuple[Tensor, ...], cache: list[Stats] | None) -> Tensor:
        return self._act(super().forward(x))

    def then_conv(self, act: nn.Module, conv: nn.Module, *maps: Tensor, light: bool = True,
                  cache: list[Stats] | None = None) -> Tensor:
        """``conv(act(self(*maps, cache=cache)))``, keeping only ``maps`` for backward when ``light``: the three are
        checkpointed."""
        if not light or not torch.is_grad_enabled() or is_tracing():
            return conv(act(self(*maps, cache=cache)))
        cache = [] if cache is None else cache
        return checkpointed(True, lambda *t: conv(act(self(*t, cache=cache))), *maps)

    def between(self, conv: nn.Module, act: nn.Module, pool: nn.Module, x: Tensor) -> Tensor:
        """``pool(act(self(conv(x))))``, keeping only ``x`` for backward (a stem): the four are checkpointed."""
        cache: list[Stats] = []
        return checkpointed(True, lambda t: pool(act(self(conv(t), cache=cache))), x)


class BatchNormAct(NormAct, nn.modules.batchnorm._BatchNorm):
    """BatchNorm (+ activation) for inputs with any number of spatial dims, exact under recomputation: see the module
    docstring for the rule, and :class:`NormAct` for ``forward(*maps, cache=None)``. State-dict keys are
    ``nn.BatchNorm2d``'s."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, **kwargs: Any) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, **kwargs)

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input with channels in dim 1, got shape {tuple(input.shape)}")

    def sync_group(self) -> Any:
        """The process group whose batches this norm's statistics cover, or None for this process's own:
        ``nn.SyncBatchNorm``'s rule (a synchronised norm, training, torch.distributed initialised, more than one
        process in its group)."""
        if not (isinstance(self, nn.SyncBatchNorm) and self.training and dist.is_available()
                and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def _uses_batch_stats(self) -> bool:
        return self.training or not self.track_running_stats

    def _native(self) -> bool:
        return self.sync_group() is None

    def _momentum(self) -> float:
        """nn.BatchNorm's bookkeeping for a training batch: count it; return the running statistics' update factor.
        The one place where running statistics are counted, so called on a segment's first run only."""
        if not (self.training and self.track_running_stats):
            return 0.0
        self.num_batches_tracked.add_(1)
        return 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum

    def _norm_act(self, x: Tensor, maps: tuple[Tensor, ...], cache: list[Stats] | None) -> Tensor:
        if not self._uses_batch_stats():
            return self._act(normalize(x, self.weight, self.bias, self.running_mean, self.running_var, self.eps))
        if not self._native():
            return self._norm_act_synchronised(x, self._stats(maps, cache))
        running_mean, running_var, factor = self.running_mean, self.running_var, 0.0
        if not recomputing():
            factor = self._momentum()
        elif running_mean is not None:  # a rerun updates throwaway copies: it saves what the first run saved
            running_mean, running_var = torch.zeros_like(running_mean), torch.ones_like(running_var)
        return self._act(F.batch_norm(x, running_mean, running_var, self.weight, self.bias, True, factor, self.eps))

    def _stats(self, maps: tuple[Tensor, ...], cache: list[Stats] | None) -> Stats:
        """Batch statistics of the concatenated ``maps``: from ``cache`` where it has them (filled here as needed);
        the running statistics are updated with them on the first run."""
        group = self.sync_group()
        if cache is None or (cache and cache[0][3] is not group):
            cache = []  # no cache, or one filled for norms synchronised otherwise: this norm's statistics are its own
        for t in maps[len(cache):]:
            cache.append(batch_stats(t, group))
        used = cache[:len(maps)]
        mean, var = torch.cat([s[0] for s in used]), torch.cat([s[1] for s in used])
        count = used[0][2]
        if not recomputing():
            factor = self._momentum()
            if factor:
                with torch.no_grad():
                    self.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
                    self.running_var.mul_(1 - factor).add_(var * (count / (count - 1)), alpha=factor)
        return mean, var, count, group

    def _norm_act_synchronised(self, x: Tensor, stats: Stats) -> Tensor:
        mean, var, _, group = stats
        return self._act(SyncBatchNormWithStats.apply(x, self.weight, self.bias, mean, var, self.eps, group))

    def then_conv(self, act: nn.Module, conv: nn.Module, *maps: Tensor, light: bool = True,
                  cache: list[Stats] | None = None) -> Tensor:
        """``conv(act(self(*maps, cache=cache)))`` keeping only ``maps`` for backward when ``light``: native
        training-mode BatchNorm followed by ReLU reruns in :class:`~effidense.layers.light.NormReluConv`, a fraction
        of a checkpoint's cost and one map fewer at once in backward; otherwise the three are checkpointed."""
        if not light:
            return conv(act(self(*maps, cache=cache)))
        if self._light(act, conv):
            return NormReluConv.apply(self, act, conv, self.weight, self.bias, conv.weight, *maps)
        return super().then_conv(act, conv, *maps, cache=cache)

    def _light(self, act: nn.Module, conv: nn.Module) -> bool:
        """Whether this norm, ``act`` and ``conv`` can rerun in a light Function: native training-mode BatchNorm,
        ReLU, a convolution differentiated by hand, autograd recording and nobody tracing."""
        return torch.is_grad_enabled() and not is_tracing() and self.act is None and type(act) is nn.ReLU \
            and plain_conv(conv) and self._native() and self._uses_batch_stats()

    def between(self, conv: nn.Module, act: nn.Module, pool: nn.Module, x: Tensor) -> Tensor:
        """``pool(act(self(conv(x))))`` keeping only ``x`` for backward. Native training-mode BatchNorm followed by
        ReLU and a :class:`~effidense.layers.pool.MaxPool` reruns in
        :class:`~effidense.layers.light.ConvNormReluPool`, whose backward holds fewer maps at once than a checkpoint's
        (the ImageNet stem's backward set the peak of a 3D DenseNet's step); otherwise the four are checkpointed."""
        if isinstance(pool, MaxPool) and self._light(act, conv):
            return ConvNormReluPool.apply(x, conv.weight, self.weight, self.bias, conv, self, act, pool)
        return super().between(conv, act, pool, x)


class BatchNormAct1d(BatchNormAct, nn.BatchNorm1d):
    """:class:`BatchNormAct` that is an ``nn.BatchNorm1d``, for code that looks for one."""


class BatchNormAct2d(BatchNormAct, nn.BatchNorm2d):
    """:class:`BatchNormAct` that is an ``nn.BatchNorm2d``, for code that looks for one."""


class BatchNormAct3d(BatchNormAct, nn.BatchNorm3d):
    """:class:`BatchNormAct` that is an ``nn.BatchNorm3d``, for code that looks for one."""


BATCH_NORM_ACT = {1: BatchNormAct1d, 2: BatchNormAct2d, 3: BatchNormAct3d}  # by spatial dims


class InstanceNormAct1d(NormAct, nn.InstanceNorm1d):
    """``nn.InstanceNorm1d`` and an activation, on concatenated maps (:class:`NormAct`)."""


class InstanceNormAct2d(NormAct, nn.InstanceNorm2d):
    """``nn.InstanceNorm2d`` and an activation, on concatenated maps (:class:`NormAct`)."""


class InstanceNormAct3d(NormAct, nn.InstanceNorm3d):
    """``nn.InstanceNorm3d`` and an activation, on concatenated maps (:class:`NormAct`)."""


INSTANCE_NORM_ACT = {1: InstanceNormAct1d, 2: InstanceNormAct2d, 3: InstanceNormAct3d}  # by spatial dims


class GroupNormAct(NormAct, nn.GroupNorm):
    """``nn.GroupNorm`` (any spatial dims) and an activation, on concatenated maps (:class:`NormAct`)."""


class SyncBatchNormAct(BatchNormAct, nn.SyncBatchNorm):
    """:class:`BatchNormAct` synchronised like ``nn.SyncBatchNorm`` (which it is, for ``isinstance``): what a
    converted model's layers adopt in place of torch's SyncBatchNorm."""

    @classmethod
    def adopt(cls, sync: nn.SyncBatchNorm, act: Callable[[Tensor], Tensor] | None) -> SyncBatchNormAct:
        """A SyncBatchNormAct holding ``sync``'s very parameters, buffers and process group."""
        norm = cls(sync.num_features, sync.eps, sync.momentum, sync.affine, sync.track_running_stats, act=act,
                   process_group=sync.process_group)
        norm._parameters.update(sync._parameters)
        norm._buffers.update(sync._buffers)
        return norm.train(sync.training)


class AdoptsNorms(nn.Module):
    """A module whose :class:`BatchNormAct` children, when replaced by a torch ``nn.SyncBatchNorm`` (as
    ``nn.SyncBatchNorm.convert_sync_batchnorm`` and timm's ``--sync-bn`` do), adopt it as a
    :class:`SyncBatchNormAct` that keeps the replaced norm's activation."""

    def _adopted(self, name: str, value: Any) -> Any:
        old = self._modules.get(name) if "_modules" in self.__dict__ else None
        if isinstance(value, nn.SyncBatchNorm) and not isinstance(value, NormAct) and isinstance(old, NormAct):
            return SyncBatchNormAct.adopt(value, old.act)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, self._adopted(name, value))

    def add_module(self, name: str, module: nn.Module | None) -> None:
        super().add_module(name, self._adopted(name, module))
