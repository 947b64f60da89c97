"""DenseNet and DenseNet-BC with exact memory-efficient dense layers.

Huang et al., "Densely Connected Convolutional Networks" (2017); Pleiss et al., "Memory-Efficient Implementation of
DenseNets" (2017). State-dict keys follow torchvision's and timm's layout, so their weights load without renaming.

Memory modes (``memory=``), chosen in :func:`_run` and nowhere else:

* ``plain``: nothing is recomputed; everything autograd needs stays in memory.
* ``efficient``: every concat-BN-ReLU segment (in the stem, the dense blocks, the transitions and the final norm) runs
  under non-reentrant ``torch.utils.checkpoint``: concatenations and BN/ReLU outputs are rebuilt in backward,
  convolutions never are (checkpoint's early stop ends the recomputation once a convolution's input is rebuilt).
* ``frugal``: as efficient, but whole dense layers and the whole stem are recomputed; only each layer's new features
  and each block's input stay.

The stem's max-pool and the transitions' average pool keep nothing of their input for backward (the max-pool only its
indices, as int32), so no mode keeps the maps they pool, and transitions never recompute their convolution.

BatchNorm is split in two so that recomputation is cheap and exact. Batch statistics are computed once per feature
map, outside any recomputed segment, and shared by every layer that normalises that map (each channel's statistics
are the same in every later layer). Running statistics are updated there, once, so recomputation can never update
them twice (torchvision and timm do, pytorch/pytorch#96136). Inside segments, BN only normalises with the given
statistics; its backward is native BatchNorm's training-mode backward, so gradients are the plain model's.

``nn.SyncBatchNorm`` (``nn.SyncBatchNorm.convert_sync_batchnorm(model)``) works as it does elsewhere: in training,
with torch.distributed initialised and more than one process in the norm's group, batch statistics are those of
every process's batch (per-channel sums all-reduced: the global mean first, then squared deviations from it; ranks may
hold different batch sizes), running statistics use the global count, and backward all-reduces the per-channel
gradient sums as ``nn.SyncBatchNorm`` does (parameter gradients stay local sums, which DDP then averages). Forward
collectives run once per feature map, never in a recomputation (frugal's segments reuse their forward run's
statistics); backward ones once per norm. Unlike ``nn.SyncBatchNorm`` this also runs on CPU (gloo). Synchronised
norms are never compiled (see ``set_compile``).
"""
from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import create_classifier
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = ["DenseNet", "DenseLayer", "DenseBlock", "Transition", "MEMORY_MODES", "CONFIGS",
           "densenet121", "densenet161", "densenet169", "densenet201", "densenet264",
           "densenet40_k12", "densenet_bc100_k12", "densenet_bc250_k24", "densenet_bc190_k40"]

MEMORY_MODES = ("plain", "efficient", "frugal")

Stats = tuple[Tensor, Tensor]  # per-channel mean and biased variance
# Statistics of a feature map over a process group (nn.SyncBatchNorm): mean, biased variance, the global number of
# values per channel (a tensor, so no host sync) and the group. A feature map's cache entry is Stats or this.
SyncedStats = tuple[Tensor, Tensor, Tensor, Any]


def _run(mode: str, level: str, fn: Callable[..., Any], *tensors: Tensor | None, random: bool = False) -> Any:
    """Run a segment ``fn(*tensors)``, recomputing it in backward when the memory mode asks for ``level``.

    ``level`` is the least aggressive mode that recomputes the segment: "efficient" for BN-ReLU segments,
    "frugal" for whole layers. ``random`` segments (dropout) replay their RNG state when recomputed.
    """
    if mode == "plain" or not torch.is_grad_enabled() or (level == "frugal" and mode != "frugal"):
        return fn(*tensors)
    # Tensors go in as separate arguments: checkpoint saves those properly, a list would be held by reference only.
    return checkpoint(fn, *tensors, use_reentrant=False, preserve_rng_state=random)


def _normalize(x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, var: Tensor,
               eps: float) -> Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias, per channel."""
    if not torch.compiler.is_compiling():
        return torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps, torch.backends.cudnn.enabled)
    # Traced batch_norm fixes the channel count; this arithmetic keeps it symbolic and fuses just the same.
    scale = torch.rsqrt(var + eps)
    scale = scale if weight is None else scale * weight
    shift = -mean * scale if bias is None else bias - mean * scale
    return x * scale.view(1, -1, 1, 1).to(x.dtype) + shift.view(1, -1, 1, 1).to(x.dtype)


class _BatchNormWithStats(torch.autograd.Function):
    """Training-mode BatchNorm given its batch statistics: normalises only; backward is native BatchNorm's
    training-mode backward, which includes the gradient through the statistics."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, var: Tensor,
                eps: float) -> Tensor:
        ctx.eps = eps
        ctx.save_for_backward(x, weight, mean, torch.rsqrt(var + eps))
        return _normalize(x, weight, bias, mean, var, eps)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, mean, invstd = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
            grad, x, weight, None, None, mean, invstd, True, ctx.eps, list(ctx.needs_input_grad[:3]))
        return grad_x, grad_weight, grad_bias, None, None, None


class _SyncBatchNormWithStats(torch.autograd.Function):
    """Training-mode BatchNorm given statistics synchronised over ``group``: normalises only; backward is
    ``nn.SyncBatchNorm``'s in plain torch ops (so it runs on any device and backend): the per-channel sums of the
    gradient through the statistics are all-reduced, the weight and bias gradients are this process's sums."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, var: Tensor,
                eps: float, group: Any) -> Tensor:
        ctx.group = group
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(x, weight, mean, torch.rsqrt(var + eps))
        return _normalize(x, weight, bias, mean, var, eps)

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


class _AvgPool2x2(torch.autograd.Function):
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


class _MaxPool3x3(torch.autograd.Function):
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


def _avg_pool(x: Tensor) -> Tensor:
    """2x2 average pooling (transitions)."""
    return _AvgPool2x2.apply(x) if torch.is_grad_enabled() and x.requires_grad else F.avg_pool2d(x, 2)


def _max_pool(x: Tensor) -> Tensor:
    """3x3/2 max pooling (the ImageNet stem)."""
    return _MaxPool3x3.apply(x) if torch.is_grad_enabled() and x.requires_grad else F.max_pool2d(x, 3, 2, 1)


def _uses_batch_stats(norm: nn.BatchNorm2d) -> bool:
    return norm.training or not norm.track_running_stats


def _sync_group(norm: nn.BatchNorm2d) -> Any:
    """The process group whose batch statistics ``norm`` normalises with, or None for this process's own:
    ``nn.SyncBatchNorm``'s rule (training, torch.distributed initialised, more than one process in its group)."""
    if not (isinstance(norm, nn.SyncBatchNorm) and norm.training and dist.is_available() and dist.is_initialized()):
        return None
    group = norm.process_group if norm.process_group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


@torch.no_grad()
def _batch_stats(x: Tensor) -> Stats:
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
def _synced_batch_stats(x: Tensor, group: Any) -> SyncedStats:
    """Per-channel mean and biased variance over the batches of every process in ``group``, two-pass as in
    :func:`_batch_stats`: the global mean from all-reduced sums and counts, then all-reduced squared deviations."""
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    sums = torch.cat([x.sum((0, 2, 3)), x.new_full((1,), x.numel() // x.size(1))])
    dist.all_reduce(sums, group=group)
    total, count = sums[:-1], sums[-1]
    mean = total / count
    squares = (x - mean.view(1, -1, 1, 1)).square_().sum((0, 2, 3))
    dist.all_reduce(squares, group=group)
    return mean, squares / count, count, group


def _group_of(entry: Stats | SyncedStats) -> Any:
    return entry[3] if len(entry) > 2 else None


def _count(entry: Stats | SyncedStats, local: int) -> int | Tensor:
    """Values per channel behind ``entry``: the global count of synced statistics, else ``local``."""
    return entry[2] if len(entry) > 2 else local


@torch.no_grad()
def _track(norm: nn.BatchNorm2d, stats: Stats, count: int | Tensor) -> None:
    """Update ``norm``'s running statistics with one batch's, as ``nn.BatchNorm2d`` would in training
    (``count``: values per channel, a tensor for synchronised statistics)."""
    if not (norm.training and norm.track_running_stats):
        return
    norm.num_batches_tracked.add_(1)
    factor = 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
    mean, var = stats
    norm.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
    norm.running_var.mul_(1 - factor).add_(var * (count / (count - 1)), alpha=factor)


def _stats(norm: nn.BatchNorm2d, features: Sequence[Tensor], shared: list[Stats | SyncedStats],
           track: bool = True) -> Stats:
    """The statistics ``norm`` normalises the concatenated ``features`` with.

    In training, batch statistics from ``shared`` (the per-feature-map cache of a block, filled here as needed;
    synchronised over the norm's process group for ``nn.SyncBatchNorm``) and the running statistics are updated
    once; in eval, the running statistics.
    """
    if not _uses_batch_stats(norm):
        return norm.running_mean, norm.running_var
    group = _sync_group(norm)
    if shared and _group_of(shared[0]) is not group:
        shared = []  # cached for norms synchronised otherwise (or not at all): this norm's statistics are its own
    for t in features[len(shared):]:
        shared.append(_batch_stats(t) if group is None else _synced_batch_stats(t, group))
    used = shared[:len(features)]
    mean, var = torch.cat([s[0] for s in used]), torch.cat([s[1] for s in used])
    if track:
        _track(norm, (mean, var), _count(used[0], features[0].numel() // features[0].size(1)))
    return mean, var


def _segment_stats(norm: nn.BatchNorm2d, x: Tensor, cache: list[SyncedStats]) -> tuple[Stats, int | Tensor]:
    """Untracked statistics of ``norm`` for map ``x`` inside a recomputed segment, and the count to track them with.

    ``cache`` is a list from outside the segment: the forward run fills it and the recomputation reuses it, so backward
    neither recomputes the statistics nor runs a collective. Under torch.compile, statistics that need no collective
    are recomputed instead (bitwise the same): mutating an outside list would break the graph at the checkpoint.
    """
    synced = _sync_group(norm) is not None
    shared = cache if synced or not torch.compiler.is_compiling() else []
    stats = _stats(norm, [x], shared, track=False)
    local = x.numel() // x.size(1)
    return stats, _count(shared[0], local) if synced else local


def _normalize_relu(x: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, var: Tensor, eps: float,
                    batch_stats: bool) -> Tensor:
    if batch_stats:
        x = _BatchNormWithStats.apply(x, weight, bias, mean, var, eps)
    else:
        x = _normalize(x, weight, bias, mean, var, eps)
    return F.relu(x, inplace=True)


@functools.cache
def _compiled_normalize_relu(options: tuple[tuple[str, Any], ...]) -> Callable[..., Tensor]:
    # One graph serves every layer: channel counts and sizes are symbolic, so depth does not multiply compile time.
    return torch.compile(_normalize_relu, dynamic=True, fullgraph=True, **dict(options))


def _bn_relu(norm: nn.BatchNorm2d, x: Tensor, mean: Tensor, var: Tensor,
             compiled: tuple[tuple[str, Any], ...] | None = None) -> Tensor:
    """ReLU(BN(x)) with the given statistics; ``compiled`` holds torch.compile options, or None for eager.
    Synchronised norms always run eagerly: their backward holds a collective."""
    group = _sync_group(norm)
    if group is not None:
        return F.relu(_SyncBatchNormWithStats.apply(x, norm.weight, norm.bias, mean, var, norm.eps, group),
                      inplace=True)
    if compiled is None:
        return _normalize_relu(x, norm.weight, norm.bias, mean, var, norm.eps, _uses_batch_stats(norm))
    # Dynamo gives parameters static shapes; plain views let one graph serve every channel count.
    weight, bias = (None if t is None else t.view(-1) for t in (norm.weight, norm.bias))
    return _compiled_normalize_relu(compiled)(x, weight, bias, mean, var, norm.eps, _uses_batch_stats(norm))


def _cat(features: Sequence[Tensor]) -> Tensor:
    return torch.cat(features, 1)


class DenseLayer(nn.Module):
    """BN-ReLU-conv3x3 (DenseNet) or BN-ReLU-conv1x1-BN-ReLU-conv3x3 (DenseNet-BC) on the concatenated inputs."""

    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int | None, drop_rate: float) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        if bn_size:
            self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, 1, bias=False)
            self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
            self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, 3, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(num_input_features, growth_rate, 3, padding=1, bias=False)
        self.bottleneck = bool(bn_size)
        self.drop_rate = drop_rate
        self.compiled: tuple[tuple[str, Any], ...] | None = None  # set by DenseNet.set_compile

    def _concat_bn_relu_conv1(self, mean: Tensor, var: Tensor, *features: Tensor) -> Tensor:
        return self.conv1(_bn_relu(self.norm1, _cat(features), mean, var, self.compiled))

    def _bn_relu_conv2(self, x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
        return self.conv2(_bn_relu(self.norm2, x, mean, var, self.compiled))

    def _dropout(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.drop_rate, self.training) if self.drop_rate > 0 else x

    def _whole_layer(self, cache: list[SyncedStats], mean: Tensor, var: Tensor,
                     *features: Tensor) -> tuple[Tensor, Stats | None, int | Tensor | None]:
        """The layer as one recomputed segment; returns the bottleneck's statistics and count for tracking outside
        it (``cache``: see :func:`_segment_stats`)."""
        out = self._concat_bn_relu_conv1(mean, var, *features)
        stats = count = None
        if self.bottleneck:
            stats, count = _segment_stats(self.norm2, out, cache)
            out = self._bn_relu_conv2(out, *stats)
        return self._dropout(out), stats, count

    def forward(self, features: Sequence[Tensor], shared: list[Stats | SyncedStats], mode: str = "plain") -> Tensor:
        mean, var = _stats(self.norm1, features, shared)
        if mode == "frugal":
            random = self.training and self.drop_rate > 0
            out, stats, count = _run(mode, "frugal", functools.partial(self._whole_layer, []), mean, var, *features,
                                     random=random)
            if stats is not None:
                _track(self.norm2, stats, count)
            return out
        out = _run(mode, "efficient", self._concat_bn_relu_conv1, mean, var, *features)
        if self.bottleneck:
            out = _run(mode, "efficient", self._bn_relu_conv2, out, *_stats(self.norm2, [out], []))
        return self._dropout(out)


class DenseBlock(nn.ModuleDict):
    """``num_layers`` dense layers; takes and returns the list of feature maps (never concatenated here)
    and the cache of their batch statistics."""

    def __init__(self, num_layers: int, num_input_features: int, growth_rate: int, bn_size: int | None,
                 drop_rate: float) -> None:
        super().__init__()
        for i in range(num_layers):
            layer = DenseLayer(num_input_features + i * growth_rate, growth_rate, bn_size, drop_rate)
            self.add_module(f"denselayer{i + 1}", layer)

    def forward(self, features: list[Tensor], mode: str = "plain") -> tuple[list[Tensor], list[Stats | SyncedStats]]:
        features, shared = list(features), []
        for layer in self.values():
            features.append(layer(features, shared, mode))
        return features, shared


class Transition(nn.Module):
    """BN-ReLU-conv1x1-avgpool between dense blocks, on the block's feature list."""

    def __init__(self, num_input_features: int, num_output_features: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.conv = nn.Conv2d(num_input_features, num_output_features, 1, bias=False)
        self.compiled: tuple[tuple[str, Any], ...] | None = None  # set by DenseNet.set_compile

    def _concat_bn_relu_conv(self, mean: Tensor, var: Tensor, *features: Tensor) -> Tensor:
        return self.conv(_bn_relu(self.norm, _cat(features), mean, var, self.compiled))

    def forward(self, features: Sequence[Tensor], shared: list[Stats | SyncedStats], mode: str = "plain") -> Tensor:
        # The pooling keeps nothing for backward, so no mode needs to keep or recompute the convolution's output.
        mean, var = _stats(self.norm, features, shared)
        return _avg_pool(_run(mode, "efficient", self._concat_bn_relu_conv, mean, var, *features))


def _resolve_memory(memory: str | None, efficient: bool | None) -> str:
    """The one place where a memory mode is chosen from the arguments users pass."""
    if memory is not None and memory not in MEMORY_MODES:
        raise ValueError(f"memory must be one of {', '.join(map(repr, MEMORY_MODES))}, got {memory!r}")
    if efficient is None:
        return memory or "efficient"
    if not isinstance(efficient, bool):
        raise ValueError(f"efficient must be True or False, got {efficient!r}")
    implied = "efficient" if efficient else "plain"
    if memory is not None and (memory == "plain") == efficient:
        raise ValueError(f"memory={memory!r} contradicts efficient={efficient}; pass only one of them")
    return memory or implied


def _check_config(growth_rate: int, block_config: Sequence[int], num_init_features: int, bn_size: int | None,
                  compression: float, drop_rate: float, head_drop_rate: float, num_classes: int,
                  in_chans: int) -> None:
    def positive_int(name: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")

    positive_int("growth_rate", growth_rate)
    positive_int("num_init_features", num_init_features)
    positive_int("in_chans", in_chans)
    if bn_size is not None:
        positive_int("bn_size", bn_size)
    if isinstance(block_config, (str, bytes)) or not isinstance(block_config, Sequence) or not block_config:
        raise ValueError(f"block_config must be a non-empty sequence of layer counts, got {block_config!r}")
    for i, n in enumerate(block_config):
        positive_int(f"block_config[{i}]", n)
    if not 0 < compression <= 1:
        raise ValueError(f"compression must be in (0, 1], got {compression!r}")
    if not 0 <= drop_rate < 1:
        raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate!r}")
    if not 0 <= head_drop_rate < 1:
        raise ValueError(f"head_drop_rate must be in [0, 1), got {head_drop_rate!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"num_classes must be a non-negative integer, got {num_classes!r}")


class DenseNet(nn.Module):
    """DenseNet / DenseNet-BC with selectable memory mode.

    Args:
        growth_rate: new feature maps per dense layer (k).
        block_config: number of dense layers in each block.
        num_init_features: channels of the stem's output.
        bn_size: bottleneck width factor (DenseNet-BC: conv1x1 to bn_size*k first); None for plain DenseNet layers.
        compression: fraction of channels a transition keeps (the paper's theta).
        drop_rate: dropout on each dense layer's new features.
        head_drop_rate: dropout before the classifier.
        num_classes: classifier outputs; 0 for no classifier.
        in_chans: input image channels.
        global_pool: 'avg', 'max' or '' (no pooling); any timm pool type works.
        small_inputs: one 3x3 stride-1 conv stem for 32x32 images instead of the ImageNet 7x7/2 conv + 3x3/2 max-pool.
        memory: 'plain', 'efficient' (default) or 'frugal'; see the module docstring.
        efficient: the seed projects' spelling: True for 'efficient', False for 'plain'.
        compile: compile the BN-ReLU segments with torch.compile (see :meth:`set_compile`).
    """

    def __init__(
            self,
            growth_rate: int = 32,
            block_config: Sequence[int] = (6, 12, 24, 16),
            num_init_features: int = 64,
            bn_size: int | None = 4,
            compression: float = 0.5,
            drop_rate: float = 0.0,
            head_drop_rate: float = 0.0,
            num_classes: int = 1000,
            in_chans: int = 3,
            global_pool: str = "avg",
            small_inputs: bool = False,
            memory: str | None = None,
            efficient: bool | None = None,
            compile: bool = False,
    ) -> None:
        super().__init__()
        _check_config(growth_rate, block_config, num_init_features, bn_size, compression, drop_rate,
                      head_drop_rate, num_classes, in_chans)
        self.memory = _resolve_memory(memory, efficient)
        self.compiled: tuple[tuple[str, Any], ...] | None = None
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.small_inputs = small_inputs
        self.block_config = tuple(block_config)

        if small_inputs:
            stem = [("conv0", nn.Conv2d(in_chans, num_init_features, 3, padding=1, bias=False))]
        else:
            stem = [("conv0", nn.Conv2d(in_chans, num_init_features, 7, stride=2, padding=3, bias=False)),
                    ("norm0", nn.BatchNorm2d(num_init_features))]
        self.features = nn.Sequential(OrderedDict(stem))
        reduction = 1 if small_inputs else 4
        self.feature_info = [dict(num_chs=num_init_features, reduction=reduction // 2 or 1,
                                  module="features.conv0" if small_inputs else "features.norm0")]

        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            self.features.add_module(
                f"denseblock{i + 1}", DenseBlock(num_layers, num_features, growth_rate, bn_size, drop_rate))
            num_features += num_layers * growth_rate
            if i < len(block_config) - 1:
                self.feature_info.append(dict(num_chs=num_features, reduction=reduction,
                                              module=f"features.denseblock{i + 1}"))
                out_features = int(num_features * compression)
                self.features.add_module(f"transition{i + 1}", Transition(num_features, out_features))
                num_features = out_features
                reduction *= 2
        self.features.add_module("norm5", nn.BatchNorm2d(num_features))
        self.feature_info.append(dict(num_chs=num_features, reduction=reduction, module="features.norm5"))
        self.num_features = num_features
        self._last_index = len(block_config)  # the last feature_info map the network computes (lowered by pruning)

        self._create_head(num_classes, global_pool)
        self.head_drop = nn.Dropout(head_drop_rate)

        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
        if compile:
            self.set_compile()

    # --- memory modes and compilation ---
    def set_compile(self, enabled: bool = True, **options: Any) -> DenseNet:
        """Compile the normalise-ReLU segments with ``torch.compile(dynamic=True, fullgraph=True, **options)``.

        Regional: one graph for every layer, whatever the depth, instead of compiling the whole network; convolutions
        and concatenations stay eager so checkpoint's early stop still skips convolutions when recomputing.
        Running statistics stay outside compiled code. Norms synchronised across processes (``nn.SyncBatchNorm`` in
        training under torch.distributed) stay eager: their backward all-reduces. Returns the model.
        """
        self.compiled = tuple(sorted(options.items())) if enabled else None
        for m in self.modules():
            if isinstance(m, (DenseLayer, Transition)):
                m.compiled = self.compiled
        return self

    def set_memory(self, memory: str | None = None, efficient: bool | None = None) -> DenseNet:
        """Switch the memory mode of a built model; returns the model."""
        self.memory = _resolve_memory(memory, efficient)
        return self

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's switch: on selects 'efficient' (kept if already 'frugal'), off selects 'plain'."""
        if not enable:
            self.memory = "plain"
        elif self.memory == "plain":
            self.memory = "efficient"

    # --- shapes ---
    @property
    def min_input_size(self) -> int:
        """Smallest height/width the network accepts (every block must see at least one pixel)."""
        return self._min_size(self._last_index)

    def _min_size(self, index: int) -> int:
        size = 1
        while self._map_size(size, index) < 1:
            size += 1
        return size

    def _map_size(self, size: int, index: int) -> int:
        """Height/width of feature map ``index`` (``feature_info`` numbering) for an input of ``size``."""
        if not self.small_inputs:
            size = (size - 1) // 2 + 1  # conv0 7x7/2, padding 3
            if index == 0:
                return size
            size = (size - 1) // 2 + 1  # max-pool 3x3/2, padding 1
        for _ in range(max(index - 1, 0)):
            size //= 2  # transition avg-pool 2x2
        return size

    def _check_input(self, x: Tensor, last_index: int) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected an input of shape (N, {self.in_chans}, H, W), got {tuple(x.shape)}")
        height, width = x.shape[-2:]
        if self._map_size(min(height, width), last_index) < 1:
            size = self._min_size(last_index)
            raise ValueError(f"input of {height}x{width} is too small for this DenseNet: needs at least {size}x{size}")

    # --- forward ---
    def _stem_bn_relu(self, x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
        return _bn_relu(self.features.norm0, x, mean, var, self.compiled)

    def _whole_stem(self, cache: list[SyncedStats], pool: bool, x: Tensor) -> tuple[Tensor, Stats, int | Tensor]:
        """conv0-BN-ReLU(-max-pool) as one recomputed segment; returns norm0's statistics and count for tracking
        outside it (``cache``: see :func:`_segment_stats`)."""
        x = self.features.conv0(x)
        stats, count = _segment_stats(self.features.norm0, x, cache)
        x = self._stem_bn_relu(x, *stats)
        return _max_pool(x) if pool else x, stats, count

    def _final(self, mean: Tensor, var: Tensor, *features: Tensor) -> Tensor:
        return _bn_relu(self.features.norm5, _cat(features), mean, var, self.compiled)

    def _forward(self, x: Tensor, taps: Collection[int] = (), stop: int | None = None) -> tuple[Tensor, list[Tensor]]:
        """Feature map ``stop`` (``feature_info`` numbering; default the last the network has) and the maps
        numbered in ``taps``; nothing after map ``stop`` is computed."""
        last = len(self.block_config)
        stop = self._last_index if stop is None else min(stop, self._last_index)
        self._check_input(x, stop)
        mode, norm0 = self.memory, getattr(self.features, "norm0", None)
        tapped: list[Tensor] = []
        if self.small_inputs:
            x = self.features.conv0(x)
            if 0 in taps:
                tapped.append(x)
            if stop == 0:
                return x, tapped
        else:
            # Frugal recomputes the max-pool too, unless the map before it is wanted, so that not even its indices stay.
            pool_inside = mode == "frugal" and 0 not in taps and stop != 0
            if mode == "frugal":
                x, stats, count = _run(mode, "frugal", functools.partial(self._whole_stem, [], pool_inside), x)
                _track(norm0, stats, count)
            else:
                x = self.features.conv0(x)
                x = _run(mode, "efficient", self._stem_bn_relu, x, *_stats(norm0, [x], []))
            if not pool_inside:
                if 0 in taps:
                    tapped.append(x)
                if stop == 0:
                    return x, tapped
                x = _max_pool(x)
        features = [x]
        for i in range(1, last):
            features, shared = self.features.get_submodule(f"denseblock{i}")(features, mode)
            if i in taps or i == stop:
                x = _cat(features)
                if i in taps:
                    tapped.append(x)
                if i == stop:
                    return x, tapped
            features = [self.features.get_submodule(f"transition{i}")(features, shared, mode)]
        features, shared = self.features.get_submodule(f"denseblock{last}")(features, mode)
        x = _run(mode, "efficient", self._final, *_stats(self.features.norm5, features, shared), *features)
        if last in taps:
            tapped.append(x)
        return x, tapped

    def forward_features(self, x: Tensor) -> Tensor:
        return self._forward(x)[0]

    def forward_intermediates(
            self,
            x: Tensor,
            indices: int | list[int] | None = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """timm's feature API: index 0 is the stem's map, 1..n-1 each block's output before its transition,
        n the final norm's output. With ``stop_early`` the returned final map is the last one asked for.
        ``norm`` is accepted for timm's sake; the last map is already normalised."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        stop = max_index if stop_early or intermediates_only else None
        x, intermediates = self._forward(x, taps=set(take_indices), stop=stop)
        return intermediates if intermediates_only else (x, intermediates)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.head_drop(self.global_pool(x))
        return x if pre_logits else self.classifier(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    # --- timm model API ---
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(
            stem=r"^features\.conv0|^features\.norm0",
            blocks=r"^features\.(?:denseblock|transition)(\d+)" if coarse else [
                (r"^features\.denseblock(\d+)\.denselayer(\d+)", None),
                (r"^features\.transition(\d+)", (99999,)),
                (r"^features\.norm5", (99999,)),
            ],
        )

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.classifier

    def _create_head(self, num_classes: int, global_pool: str) -> None:
        if not global_pool and num_classes:
            raise ValueError(f"global_pool='' (no pooling) needs num_classes=0, got num_classes={num_classes}: "
                             "a linear classifier needs pooled features")
        self.num_classes = num_classes
        self.global_pool, self.classifier = create_classifier(self.num_features, num_classes, pool_type=global_pool)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """New classifier for ``num_classes`` (0: none), optionally with a new pooling type."""
        pool_type = self.global_pool.pool_type if global_pool is None else global_pool
        self._create_head(num_classes, pool_type)
        weight = self.features.conv0.weight
        self.classifier.to(device=weight.device, dtype=weight.dtype)
        self.global_pool.train(self.training)
        self.classifier.train(self.training)

    def prune_intermediate_layers(
            self,
            indices: int | list[int] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> list[int]:
        """Drop the layers that feature maps ``indices`` do not need (timm's ``features_only`` calls this).

        The network then ends at the last wanted map; the head goes with ``prune_head`` or whenever the end moved,
        since the classifier was sized for the final features. Returns the kept indices.
        """
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        if max_index > self._last_index:
            raise ValueError(f"feature map {max_index} was already pruned away (the network ends at map "
                             f"{self._last_index})")
        last = len(self.block_config)
        if max_index < self._last_index:
            dropped = [f"denseblock{i}" for i in range(max_index + 1, last + 1)]
            dropped += [f"transition{i}" for i in range(max(max_index, 1), last)] + ["norm5"]
            for name in dropped:
                if name in self.features._modules:
                    delattr(self.features, name)
            self._last_index = max_index
            self.num_features = self.feature_info[max_index]["num_chs"]
        if prune_head or max_index < last:
            self.reset_classifier(0, "")
        return take_indices


# name: (growth_rate, block_config, num_init_features, bn_size, compression, small_inputs, default num_classes)
CONFIGS: dict[str, dict[str, Any]] = {
    "densenet121": dict(growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64),
    "densenet161": dict(growth_rate=48, block_config=(6, 12, 36, 24), num_init_features=96),
    "densenet169": dict(growth_rate=32, block_config=(6, 12, 32, 32), num_init_features=64),
    "densenet201": dict(growth_rate=32, block_config=(6, 12, 48, 32), num_init_features=64),
    "densenet264": dict(growth_rate=32, block_config=(6, 12, 64, 48), num_init_features=64),
    # CIFAR nets (Huang et al., Table 2): 3 blocks, 3x3 stem, 10 classes by default.
    "densenet40_k12": dict(growth_rate=12, block_config=(12, 12, 12), num_init_features=16, bn_size=None,
                           compression=1.0, small_inputs=True, num_classes=10),
    "densenet_bc100_k12": dict(growth_rate=12, block_config=(16, 16, 16), num_init_features=24,
                               small_inputs=True, num_classes=10),
    "densenet_bc250_k24": dict(growth_rate=24, block_config=(41, 41, 41), num_init_features=48,
                               small_inputs=True, num_classes=10),
    "densenet_bc190_k40": dict(growth_rate=40, block_config=(31, 31, 31), num_init_features=80,
                               small_inputs=True, num_classes=10),
}


def _build(name: str, **kwargs: Any) -> DenseNet:
    return DenseNet(**{**CONFIGS[name], **kwargs})


def densenet121(**kwargs: Any) -> DenseNet:
    """DenseNet-121 (k=32), ImageNet."""
    return _build("densenet121", **kwargs)


def densenet161(**kwargs: Any) -> DenseNet:
    """DenseNet-161 (k=48), ImageNet."""
    return _build("densenet161", **kwargs)


def densenet169(**kwargs: Any) -> DenseNet:
    """DenseNet-169 (k=32), ImageNet."""
    return _build("densenet169", **kwargs)


def densenet201(**kwargs: Any) -> DenseNet:
    """DenseNet-201 (k=32), ImageNet."""
    return _build("densenet201", **kwargs)


def densenet264(**kwargs: Any) -> DenseNet:
    """DenseNet-264 (k=32), ImageNet."""
    return _build("densenet264", **kwargs)


def densenet40_k12(**kwargs: Any) -> DenseNet:
    """DenseNet-40 (k=12, no bottleneck, no compression), CIFAR."""
    return _build("densenet40_k12", **kwargs)


def densenet_bc100_k12(**kwargs: Any) -> DenseNet:
    """DenseNet-BC-100 (k=12), CIFAR."""
    return _build("densenet_bc100_k12", **kwargs)


def densenet_bc250_k24(**kwargs: Any) -> DenseNet:
    """DenseNet-BC-250 (k=24), CIFAR."""
    return _build("densenet_bc250_k24", **kwargs)


def densenet_bc190_k40(**kwargs: Any) -> DenseNet:
    """DenseNet-BC-190 (k=40), CIFAR."""
    return _build("densenet_bc190_k40", **kwargs)


# --- timm registry: `import effidense` makes timm.create_model('effi_densenet121') work ---

def _filter_pretrained(state_dict: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """timm's ``pretrained_filter_fn``: torchvision (legacy names too), timm and effidense checkpoints all load."""
    from .convert import timm_pretrained_filter  # imported here: effidense.convert imports this module

    return timm_pretrained_filter(state_dict, model)


def _create(name: str, pretrained: bool, **kwargs: Any) -> DenseNet:
    # timm's meanings: drop_rate is dropout before the classifier, proj_drop_rate after each dense layer.
    if "drop_rate" in kwargs:
        kwargs["head_drop_rate"] = kwargs.pop("drop_rate")
    if "proj_drop_rate" in kwargs:
        kwargs["drop_rate"] = kwargs.pop("proj_drop_rate")
    kwargs = {**CONFIGS[name], **kwargs}
    # every feature map by default: the stem, each block but the last, the final norm (timm assumes five)
    out_indices = tuple(range(len(kwargs["block_config"]) + 1))
    return build_model_with_cfg(
        DenseNet, f"effi_{name}", pretrained, feature_cfg=dict(feature_cls="getter", out_indices=out_indices),
        pretrained_filter_fn=_filter_pretrained, **kwargs)


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.875, "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "features.conv0", "classifier": "classifier", "license": "apache-2.0",
        "paper_ids": "arXiv:1608.06993", **kwargs,
    }


def _tv_cfg(**kwargs: Any) -> dict[str, Any]:
    return _cfg(license="bsd-3-clause", origin_url="https://github.com/pytorch/vision", **kwargs)


def _timm_cfg(**kwargs: Any) -> dict[str, Any]:
    return _cfg(origin_url="https://github.com/huggingface/pytorch-image-models", **kwargs)


def _cifar_cfg(**kwargs: Any) -> dict[str, Any]:
    return _cfg(num_classes=10, input_size=(3, 32, 32), pool_size=(8, 8), crop_pct=1.0, interpolation="bilinear",
                mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616), license="mit", **kwargs)


# Tags name where weights come from: tv_in1k = torchvision's ImageNet weights, ra_in1k = timm's (densenet121 only).
# No weights are hosted; pass the torchvision/timm file, or one tools/convert.py wrote, with
# pretrained_cfg_overlay=dict(file=...). The first tag of each model is its default.
default_cfgs = generate_default_cfgs({
    "effi_densenet121.tv_in1k": _tv_cfg(),
    "effi_densenet121.ra_in1k": _timm_cfg(test_input_size=(3, 288, 288), test_crop_pct=0.95),
    "effi_densenet161.tv_in1k": _tv_cfg(),
    "effi_densenet169.tv_in1k": _tv_cfg(),
    "effi_densenet201.tv_in1k": _tv_cfg(),
    "effi_densenet264.untrained": _cfg(license="mit"),
    "effi_densenet40_k12.untrained": _cifar_cfg(),
    "effi_densenet_bc100_k12.untrained": _cifar_cfg(),
    "effi_densenet_bc250_k24.untrained": _cifar_cfg(),
    "effi_densenet_bc190_k40.untrained": _cifar_cfg(),
})


@register_model
def effi_densenet121(pretrained: bool = False, **kwargs: Any) -> DenseNet:
    """DenseNet-121 (k=32), ImageNet."""
    return _create("densenet121", pretrained, **kwargs)


@register_model
def effi_densenet161(pretrained: bool = False, **kwargs: Any) -> DenseNet:
    """DenseNet-161 (k=48), ImageNet."""
    return _create("densenet161", pretrained, **kwargs)


@register_model
def effi_densenet169(pretrained: bool = False, **kwargs: Any) -> DenseNet:
    """DenseNet-169 (k=32), ImageNet."""
    return _create("densenet169", pretrained, **kwargs)


@register_model
def effi_densenet201(pretrained: bool = False, **kwargs: Any) -> DenseNet:
    """DenseNet-201 (k=32), ImageNet."""
    return _create("densenet201", pretrained, **kwargs)


@register_model
def effi_densenet264(pretrained: bool = False, **kwargs: Any) -> DenseNet:
    """DenseNet-264 (k=32), ImageNet."""
    return _create("densenet264", pretrained, **kwargs)


@register_model
def effi_densenet40_k12(pretrained: bool = False, **kwargs: Any) -> DenseNet:
    """DenseNet-40 (k=12, no bottleneck, no compression), CIFAR."""
    return _create("densenet40_k12", pretrained, **kwargs)


@register_model
def effi_densenet_bc100_k12(pretrained: bool = False, **kwargs: Any) -> DenseNet:
    """DenseNet-BC-100 (k=12), CIFAR."""
    return _create("densenet_bc100_k12", pretrained, **kwargs)


@register_model
def effi_densenet_bc250_k24(pretrained: bool = False, **kwargs: Any) -> DenseNet:
    """DenseNet-BC-250 (k=24), CIFAR."""
    return _create("densenet_bc250_k24", pretrained, **kwargs)


@register_model
def effi_densenet_bc190_k40(pretrained: bool = False, **kwargs: Any) -> DenseNet:
    """DenseNet-BC-190 (k=40), CIFAR."""
    return _create("densenet_bc190_k40", pretrained, **kwargs)
