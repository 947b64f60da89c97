"""Norms (+ activation) that stay exact when the segment they run in is recomputed.

**The rule: running statistics are updated on a segment's first run only, and a rerun reproduces that run bitwise.**
torchvision and timm update them again on every rerun (pytorch/pytorch#96136); :class:`BatchNormAct` never does:

* native: ``F.batch_norm`` with the running buffers on the first run; a rerun (:func:`.recompute.rerunning`: a
  segment's, or any run in backward, as under a checkpoint of the user's own around the model) hands it throwaway
  copies, so it saves the same tensors and normalises bitwise alike. Under ``torch.compile`` the compiled
  graph applies buffer updates once, however it recomputes.
* synchronised (``nn.SyncBatchNorm`` under torch.distributed): the first run computes batch statistics with their
  collectives and hands them to the rerun (:func:`.recompute.handed`), which runs no collective. Normalising with
  given statistics backpropagates through them (:class:`SyncBatchNormWithStats`), on any device and backend.

``nn.SyncBatchNorm.convert_sync_batchnorm(model)`` works as elsewhere: the modules that hold norms adopt the
``nn.SyncBatchNorm`` it puts in place of one (:class:`AdoptsNorms`), keeping its parameters, buffers, process group
and the replaced norm's activation. Unlike torch's SyncBatchNorm this also runs on CPU.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.layers import BatchNormAct2d as TimmBatchNormAct2d
from timm.layers import create_act_layer, get_norm_layer
from timm.layers import norm_act as timm_norm_act
from torch import Tensor, nn

from .recompute import fx_leaf, handed, recomputing, rerunning

__all__ = ["ActLayer", "Activation", "AdoptsNorms", "Affine", "BATCH_NORM_ACT", "BatchNormAct", "BatchNormAct1d",
           "BatchNormAct2d", "BatchNormAct3d", "GroupNormAct", "INSTANCE_NORM_ACT", "InstanceNormAct1d",
           "InstanceNormAct2d", "InstanceNormAct3d", "NormAct", "NormLayer", "SyncBatchNormAct",
           "SyncBatchNormWithStats", "affine", "batch_stats", "grad_sums", "input_grad", "norm_and_act",
           "normalize_maps", "normalized", "relu_"]

# What makes a layer's norm: a callable of the channels, or a timm norm name; what makes its activation: a timm
# activation name, or an nn.Module class or another callable that makes one.
NormLayer = Callable[[int], nn.Module] | str
ActLayer = str | Callable[..., nn.Module]


def _per_channel(t: Tensor, dims: int) -> Tensor:
    return t.view(1, -1, *([1] * (dims - 2)))


def _reduced(x: Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


class SyncBatchNormWithStats(torch.autograd.Function):
    """Training-mode BatchNorm given statistics synchronised over ``group``. Backward is ``nn.SyncBatchNorm``'s in
    plain torch ops: the per-channel sums of the gradient through the statistics are all-reduced; the weight and bias
    gradients are this process's sums (DDP's all-reduce combines them). Half-precision affine parameters are used in
    the statistics' precision (float32), as cuDNN's BatchNorm keeps them."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, var: Tensor,
                eps: float, group: Any) -> Tensor:
        ctx.group, ctx.bias_dtype = group, None if bias is None else bias.dtype
        ctx.save_for_backward(x, weight, mean, torch.rsqrt(var + eps))
        weight, bias = (None if p is None else p.to(mean.dtype) for p in (weight, bias))
        return torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps, torch.backends.cudnn.enabled)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, mean, invstd = ctx.saved_tensors
        stats = affine(mean, invstd, weight, None, x.dim())
        sum_dy, sum_dy_xhat = grad_sums(grad, x, stats)
        grad_x = None
        if ctx.needs_input_grad[0]:
            sums = torch.cat([sum_dy, sum_dy_xhat, sum_dy.new_full((1,), x.numel() // x.size(1))])
            dist.all_reduce(sums, group=ctx.group)
            total_dy, total_dy_xhat, count = sums.split([sum_dy.numel(), sum_dy.numel(), 1])
            grad_x = input_grad(grad, x, stats, total_dy, total_dy_xhat, count)
        grad_weight = sum_dy_xhat.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = sum_dy.to(ctx.bias_dtype) if ctx.bias_dtype is not None and ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias, None, None, None, None


class Affine(NamedTuple):
    """A training-mode BatchNorm's batch statistics and affine parameters, shaped to broadcast over its input and in
    the statistics' precision: worked out once, read by every part of the batch rebuilt from them."""

    mean: Tensor
    invstd: Tensor
    scale: Tensor  # invstd times the weight
    shift: Tensor | None  # the bias

    def channels(self, part: slice) -> Affine:
        """These statistics and parameters for the channels ``part``."""
        return Affine(*(None if t is None else t[:, part] for t in self))


def affine(mean: Tensor, invstd: Tensor, weight: Tensor | None, bias: Tensor | None, dims: int) -> Affine:
    scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
    shift = None if bias is None else _per_channel(bias.to(mean.dtype), dims)
    return Affine(_per_channel(mean, dims), _per_channel(invstd, dims), _per_channel(scale, dims), shift)


def _xhat(x: Tensor, a: Affine) -> Tensor:
    """The normalised input, in a tensor of its own in the statistics' precision (free to overwrite)."""
    return x.to(a.mean.dtype, copy=True).sub_(a.mean).mul_(a.invstd)


def normalized(x: Tensor, a: Affine) -> Tensor:
    """Training-mode BatchNorm's output given the statistics its forward used, computed in their precision and
    returned in ``x``'s dtype: a part of the batch rebuilt as the whole batch's forward normalised it. In place
    where it can, since a slice's temporaries are what a sliced backward holds beside what it must."""
    y = x.to(a.mean.dtype, copy=True).sub_(a.mean).mul_(a.scale)
    if a.shift is not None:
        y.add_(a.shift)
    return y.to(x.dtype)


def grad_sums(grad: Tensor, x: Tensor, a: Affine) -> tuple[Tensor, Tensor]:
    """Training-mode BatchNorm's backward, its first half: per channel, the sums of the output's gradient and of
    the gradient times the normalised input, over this part of the batch, in the statistics' precision."""
    grad = grad.to(a.mean.dtype)
    return grad.sum(_reduced(x)), _xhat(x, a).mul_(grad).sum(_reduced(x))


def input_grad(grad: Tensor, x: Tensor, a: Affine, sum_dy: Tensor, sum_dy_xhat: Tensor, count: Tensor | int) -> Tensor:
    """Its second half: the input's gradient, given the sums over the whole batch (``count`` values per channel)."""
    dims = x.dim()
    grad_x = _xhat(x, a).mul_(_per_channel(sum_dy_xhat / count, dims))
    # into the same buffer; a gradient of lower precision is read as it is, widened exactly, with no copy
    exact = torch.promote_types(grad.dtype, a.mean.dtype) == a.mean.dtype
    torch.sub(grad if exact else grad.to(a.mean.dtype), grad_x, out=grad_x)
    grad_x.sub_(_per_channel(sum_dy / count, dims))
    return grad_x.mul_(a.scale).to(x.dtype)


@torch.no_grad()
def batch_stats(x: Tensor, group: Any) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel mean and biased variance of the batches of every process in ``group``, in at least float32, and
    the count of values per channel: the global mean from all-reduced sums and counts, then all-reduced squared
    deviations (two-pass: several times faster than Welford on CPU)."""
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    sums = torch.cat([x.sum(_reduced(x)), x.new_full((1,), x.numel() // x.size(1))])
    dist.all_reduce(sums, group=group)
    count = sums[-1]
    mean = sums[:-1] / count
    squares = (x - _per_channel(mean, x.dim())).square_().sum(_reduced(x))
    dist.all_reduce(squares, group=group)
    return mean, squares / count, count


def relu_(x: Tensor) -> Tensor:
    """In-place ReLU, the default activation: a norm's output is its own, so overwriting it is safe."""
    return F.relu(x, inplace=True)


class Activation(nn.Module):
    """An activation function as a module of its own (``relu1``, MONAI's ``class_layers.relu``), one fx node."""

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
    nn.InstanceNorm3d)``. A DenseNet's layers take the activation out as a module of their own (:func:`norm_and_act`),
    so that ``norm1`` means what torchvision's does and ``relu1`` follows it.

    ``forward(*maps)`` concatenates inside the norm, so inside its segment: a rerun rebuilds the concatenation rather
    than keeping it. Other norms than BatchNorm are exact under recomputation by nature, or, with running statistics
    (instance norm's), as a rerun starts from those its first run found (:mod:`.recompute`). Under ``torch.fx`` a
    norm is one leaf node. State-dict keys are the norm class's.
    """

    def __init__(self, *args: Any, act: Callable[[Tensor], Tensor] | None = relu_, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.act = act

    def extra_repr(self) -> str:
        return super().extra_repr() + ("" if self.act is relu_ else f", act={getattr(self.act, '__name__', self.act)}")

    def forward(self, *maps: Tensor) -> Tensor:
        node = fx_leaf(self, *maps)
        if node is not None:
            return node
        x = self.normalize(maps[0] if len(maps) == 1 else torch.cat(maps, 1))
        return x if self.act is None else self.act(x)

    def normalize(self, x: Tensor) -> Tensor:
        return super().forward(x)


class BatchNormAct(NormAct, nn.modules.batchnorm._BatchNorm):
    """BatchNorm (+ activation) for any number of spatial dims, exact under recomputation (the module docstring).
    State-dict keys are ``nn.BatchNorm2d``'s."""

    reruns_exactly = True  # a rerun updates no buffer: nothing to put back after it (:mod:`.recompute`)

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input with channels in dim 1, got shape {tuple(input.shape)}")

    def sync_group(self) -> Any:
        """The process group whose batches this norm's statistics cover, or None for this process's own:
        ``nn.SyncBatchNorm``'s rule (synchronised, training, torch.distributed up, more than one process)."""
        if not (isinstance(self, nn.SyncBatchNorm) and self.training and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def native_training(self) -> bool:
        """Whether it normalises with this process's batch statistics, by torch's own kernel."""
        return (self.training or not self.track_running_stats) and self.sync_group() is None

    def count_batch(self) -> float:
        """nn.BatchNorm's bookkeeping for a training batch: count it; return the update factor. Called on a
        segment's first run only."""
        if not (self.training and self.track_running_stats):
            return 0.0
        self.num_batches_tracked.add_(1)
        return 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum

    def normalize(self, x: Tensor) -> Tensor:
        if not (self.training or not self.track_running_stats):
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        group = self.sync_group()
        if group is not None:
            return self._synchronised(x, group)
        running_mean, running_var, factor = self.running_buffers()
        return F.batch_norm(x, running_mean, running_var, self.weight, self.bias, True, factor, self.eps)

    @staticmethod
    def first_run() -> bool:
        """Whether this run is its segment's first, which alone updates the running statistics: not a rerun of this
        package's, nor any run in backward (a rerun too, whoever checkpoints it)."""
        return not rerunning()

    def running_buffers(self) -> tuple[Tensor | None, Tensor | None, float]:
        """The running statistics a training-mode run hands BatchNorm's kernel, and their update factor: on a
        segment's first run the norm's own (the batch counted), on a rerun throwaway copies, so that it saves what the
        first run saved and updates nothing."""
        if self.first_run():
            return self.running_mean, self.running_var, self.count_batch()
        if self.running_mean is None:
            return None, None, 0.0
        return torch.zeros_like(self.running_mean), torch.ones_like(self.running_var), 0.0

    def _synchronised(self, x: Tensor, group: Any) -> Tensor:
        # A tensor subclass (MONAI's MetaTensor) would wrap the Function's output as a view that the in-place ReLU
        # after the norm may not change (torch's SyncBatchNorm fails so): the norm computes on a plain tensor.
        x = x if type(x) is Tensor else x.as_subclass(Tensor)
        values = handed()
        if recomputing() and values:
            mean, var = values.pop(0)
        else:
            mean, var, count = batch_stats(x, group)
            factor = self.count_batch() if self.first_run() else 0.0
            if factor:
                with torch.no_grad():
                    self.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
                    self.running_var.mul_(1 - factor).add_(var * (count / (count - 1)), alpha=factor)
            if values is not None:
                values.append((mean, var))
        return SyncBatchNormWithStats.apply(x, self.weight, self.bias, mean, var, self.eps, group)


class BatchNormAct1d(BatchNormAct, nn.BatchNorm1d):
    """:class:`BatchNormAct` that is an ``nn.BatchNorm1d``, for code that looks for one."""


class BatchNormAct2d(BatchNormAct, nn.BatchNorm2d):
    """:class:`BatchNormAct` that is an ``nn.BatchNorm2d``, for code that looks for one."""


class BatchNormAct3d(BatchNormAct, nn.BatchNorm3d):
    """:class:`BatchNormAct` that is an ``nn.BatchNorm3d``, for code that looks for one."""


class InstanceNormAct1d(NormAct, nn.InstanceNorm1d):
    """``nn.InstanceNorm1d`` and an activation, on concatenated maps (:class:`NormAct`)."""


class InstanceNormAct2d(NormAct, nn.InstanceNorm2d):
    """``nn.InstanceNorm2d`` and an activation, on concatenated maps (:class:`NormAct`)."""


class InstanceNormAct3d(NormAct, nn.InstanceNorm3d):
    """``nn.InstanceNorm3d`` and an activation, on concatenated maps (:class:`NormAct`)."""


class GroupNormAct(NormAct, nn.GroupNorm):
    """``nn.GroupNorm`` (any spatial dims) and an activation, on concatenated maps (:class:`NormAct`)."""


BATCH_NORM_ACT = {1: BatchNormAct1d, 2: BatchNormAct2d, 3: BatchNormAct3d}  # by spatial dims
INSTANCE_NORM_ACT = {1: InstanceNormAct1d, 2: InstanceNormAct2d, 3: InstanceNormAct3d}
_ADOPTED = {nn.BatchNorm1d: BatchNormAct1d, nn.BatchNorm2d: BatchNormAct2d, nn.BatchNorm3d: BatchNormAct3d,
            TimmBatchNormAct2d: BatchNormAct2d}  # by type


class SyncBatchNormAct(BatchNormAct, nn.SyncBatchNorm):
    """:class:`BatchNormAct` synchronised like ``nn.SyncBatchNorm`` (which it is, for ``isinstance``)."""


def _adopted(norm: nn.Module, act: Callable[[Tensor], Tensor] | None) -> nn.Module:
    """The :class:`BatchNormAct` of torch's BatchNorm ``norm`` (synchronised or of 1-3 dims, or timm's
    ``BatchNormAct2d`` that applies nothing but the norm), holding its very parameters, buffers and process group,
    with ``act``; any other module as it is."""
    cls = SyncBatchNormAct if isinstance(norm, nn.SyncBatchNorm) else _ADOPTED.get(type(norm))
    # timm's norm-act layers are adopted only where they apply nothing but the norm
    if cls is None or isinstance(norm, NormAct) or not all(
            isinstance(getattr(norm, name, None), (nn.Identity, type(None))) for name in ("act", "drop")):
        return norm
    group = {"process_group": norm.process_group} if cls is SyncBatchNormAct else {}
    adopted = cls(norm.num_features, norm.eps, norm.momentum, norm.affine, norm.track_running_stats, act=act, **group)
    adopted._parameters.update(norm._parameters)
    adopted._buffers.update(norm._buffers)
    return adopted.train(norm.training)


_BATCH_NORM_NAMES = {"batchnorm", "batchnorm1d", "batchnorm2d", "batchnorm3d"}


def norm_and_act(norm_layer: NormLayer | None, act_layer: ActLayer | None, channels: int,
                 spatial_dims: int) -> tuple[nn.Module, nn.Module]:
    """A norm for ``channels`` and the activation module that follows it (torchvision's ``norm1`` and ``relu1``),
    as timm's models take them. ``norm_layer``: None (BatchNorm), a timm norm name (``'batchnorm'``, any dims;
    ``'groupnorm'``, ``'layernorm2d'``, ...) or a callable that makes, for a number of channels, a :class:`NormAct`
    (its activation becomes the module after it), torch's BatchNorm (adopted as :class:`BatchNormAct`, exact under
    recomputation), one of timm's norm-act layers (its activation becomes the module after it, and its BatchNorm is
    adopted), or any other norm (``nn.GroupNorm``, torchvision's ``FrozenBatchNorm2d``), given the maps'
    concatenation and rerun as it is, from the buffers its first run found (:mod:`.recompute`). ``act_layer``: None
    (the norm's own activation, else in-place ReLU), a timm activation name (``'silu'``, ``'gelu'``; ``''`` for none),
    an ``nn.Module`` class or what makes one (``functools.partial(nn.LeakyReLU, negative_slope=0.2)``), made in place
    where it can be."""
    if norm_layer is None or isinstance(norm_layer, str) and norm_layer.replace("_", "").lower() in _BATCH_NORM_NAMES:
        norm_layer = BATCH_NORM_ACT[spatial_dims]
    elif isinstance(norm_layer, str):
        try:
            norm_layer = get_norm_layer(norm_layer)
        except KeyError:
            raise ValueError(f"norm_layer={norm_layer!r} is not a timm norm name (e.g. 'batchnorm', 'groupnorm', "
                             "'layernorm2d')") from None
    made = norm_layer(channels)
    act = _own_act(made)
    norm = _adopted(made, None)
    if isinstance(norm, NormAct):
        norm.act = None  # the module after it applies it
    if act_layer is None:  # torchvision's nn.ReLU(inplace=True) for the default
        return norm, nn.ReLU(inplace=True) if act is relu_ else nn.Identity() if act is None else \
            act if isinstance(act, nn.Module) else Activation(act)
    if act is not relu_:
        raise ValueError(f"norm_layer makes its own activation ({getattr(act, '__name__', act)}) and "
                         f"act_layer={act_layer!r} another: pass one of them")
    try:
        made = create_act_layer(act_layer, inplace=True)
    except KeyError:
        raise ValueError(f"act_layer={act_layer!r} is not a timm activation name (e.g. 'relu', 'silu', "
                         "'gelu')") from None
    except TypeError:  # a function of a tensor, not what makes a module
        made = act_layer
    if made is None:  # timm's '' for none
        return norm, nn.Identity()
    if not isinstance(made, nn.Module):
        raise TypeError(f"act_layer must be a timm activation name ('relu', 'silu', 'gelu', ...), an nn.Module class "
                        f"or what makes one (functools.partial(nn.LeakyReLU, negative_slope=0.2)), got {act_layer!r}")
    return norm, made


def _own_act(norm: nn.Module) -> Callable[[Tensor], Tensor] | None:
    """The activation ``norm`` applies after itself, taken out of it for the module after it: a :class:`NormAct`'s
    function, the module of one of timm's norm-act layers (left an ``nn.Identity``; its default ReLU counts as
    :func:`relu_`, the default, which ``act_layer`` may replace), None for none; any other norm's is :func:`relu_`."""
    if isinstance(norm, NormAct):
        return norm.act
    act = getattr(norm, "act", None)
    if type(norm).__module__ != timm_norm_act.__name__ or not isinstance(act, nn.Module):
        return relu_
    norm.act = nn.Identity()
    return None if isinstance(act, nn.Identity) else relu_ if type(act) is nn.ReLU else act


def normalize_maps(norm: nn.Module, *maps: Tensor) -> Tensor:
    """``norm`` on the maps' concatenation: a :class:`NormAct` concatenates them itself (inside its segment); another
    norm put in one's place (timm's ``freeze_batch_norm_2d`` puts a ``FrozenBatchNorm2d``) is given it."""
    return norm(*maps) if isinstance(norm, NormAct) or len(maps) == 1 else norm(torch.cat(maps, 1))


class AdoptsNorms(nn.Module):
    """A module whose norms, replaced by torch's BatchNorm (``nn.SyncBatchNorm``, as ``convert_sync_batchnorm`` and
    timm's ``--sync-bn`` put, or ``nn.BatchNorm2d``, as timm's ``unfreeze_batch_norm_2d`` puts back; or by
    assignment), adopt it as a :class:`BatchNormAct`, exact under recomputation."""

    def add_module(self, name: str, module: nn.Module | None) -> None:
        old = self._modules.get(name) if "_modules" in self.__dict__ else None
        if module is not None:
            module = _adopted(module, old.act if isinstance(old, NormAct) else None)
        super().add_module(name, module)

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, nn.modules.batchnorm._BatchNorm):
            self.add_module(name, value)
        else:
            super().__setattr__(name, value)
