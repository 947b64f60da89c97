"""DenseNet and DenseNet-BC with exact memory-efficient dense layers.

Huang et al., "Densely Connected Convolutional Networks" (2017); Pleiss et al., "Memory-Efficient Implementation of
DenseNets" (2017). State-dict keys follow torchvision's and timm's layout, so their weights load without renaming.

Memory modes (``memory=``), chosen in :func:`_run` (and, for the bottleneck's light recompute, in
:meth:`DenseLayer.forward`):

* ``plain``: nothing is recomputed; everything autograd needs stays in memory.
* ``efficient``: every concat-BN-ReLU segment (in the stem, the dense blocks, the transitions and the final norm) runs
  under non-reentrant ``torch.utils.checkpoint``: concatenations and BN/ReLU outputs are rebuilt in backward,
  convolutions never are (checkpoint's early stop ends the recomputation once a convolution's input is rebuilt). The
  bottleneck's BN-ReLU-conv3x3, which concatenates nothing, recomputes in :class:`~effidense.layers.norm_act.BNReLUConv`
  instead, a lighter autograd Function: one checkpoint per dense layer.
* ``frugal``: as efficient, but whole dense layers and the whole stem are recomputed; only each layer's new features
  and each block's input stay.

The stem's max-pool and the transitions' average pool keep nothing of their input for backward
(:mod:`effidense.layers.pool`), so no mode keeps the maps they pool, and transitions never recompute their convolution.

BatchNorm stays exact under recomputation because running statistics are updated once, on a segment's first run,
and a rerun reproduces the first run's output bitwise (:mod:`effidense.layers.norm_act`).
"""
from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import create_classifier
from timm.models._features import feature_take_indices
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from . import trace
from .layers import norm_act
from .layers.norm_act import Stats, SyncedStats
from .layers.pool import avg_pool, max_pool

__all__ = ["DenseNet", "DenseLayer", "DenseBlock", "Transition", "MEMORY_MODES"]

MEMORY_MODES = ("plain", "efficient", "frugal")


def _run(mode: str, level: str, fn: Callable[..., Any], *tensors: Tensor | None, random: bool = False) -> Any:
    """Run a segment ``fn(*tensors)``, recomputing it in backward when the memory mode asks for ``level``.

    ``level`` is the least aggressive mode that recomputes the segment: "efficient" for BN-ReLU segments,
    "frugal" for whole layers. ``random`` segments (dropout) replay their RNG state when recomputed.
    """
    if mode == "plain" or not torch.is_grad_enabled() or (level == "frugal" and mode != "frugal"):
        return fn(*tensors)
    # Tensors go in as separate arguments: checkpoint saves those properly, a list would be held by reference only.
    # Segments are deterministic and save the same tensors when rerun (norm_act.OneShot sees to it for BatchNorm), so
    # checkpoint's per-tensor metadata check is skipped: it costs ~7% of an efficient step's host time.
    return checkpoint(fn, *tensors, use_reentrant=False, preserve_rng_state=random, determinism_check="none")


def _cat(features: Sequence[Tensor]) -> Tensor:
    return features[0] if len(features) == 1 else torch.cat(features, 1)


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

    # Segments take what norm_act.prepare made outside them: statistics, or a OneShot for native BatchNorm.
    def _concat_bn_relu_conv1(self, once: norm_act.OneShot | None, mean: Tensor | None, var: Tensor | None,
                              *features: Tensor) -> Tensor:
        return self.conv1(norm_act.bn_relu(self.norm1, _cat(features), mean, var, self.compiled, once))

    def _bn_relu_conv2(self, once: norm_act.OneShot | None, x: Tensor, mean: Tensor | None,
                       var: Tensor | None) -> Tensor:
        return self.conv2(norm_act.bn_relu(self.norm2, x, mean, var, self.compiled, once))

    def _dropout(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.drop_rate, self.training) if self.drop_rate > 0 else x

    def _whole_layer(self, cache: list[SyncedStats], once1: norm_act.OneShot | None, once2: norm_act.OneShot | None,
                     mean: Tensor | None, var: Tensor | None,
                     *features: Tensor) -> tuple[Tensor, Stats | None, int | Tensor | None]:
        """The layer as one recomputed segment (frugal). Returns the bottleneck's statistics and count for tracking
        outside it when it uses shared statistics (``cache``: see :func:`norm_act.segment_stats`)."""
        out = self._concat_bn_relu_conv1(once1, mean, var, *features)
        stats = count = None
        if self.bottleneck:
            if once2 is None:
                stats, count = norm_act.segment_stats(self.norm2, out, cache)
                out = self._bn_relu_conv2(None, out, *stats)
            else:
                out = self._bn_relu_conv2(once2, out, None, None)
        return self._dropout(out), stats, count

    def forward(self, features: Sequence[Tensor], shared: list[Stats | SyncedStats], mode: str = "plain") -> Tensor:
        mean, var, once = norm_act.prepare(self.norm1, features, shared, self.compiled)
        if mode == "frugal":
            random = self.training and self.drop_rate > 0
            once2 = norm_act.inner_once(self.norm2, self.compiled) if self.bottleneck else None
            out, stats, count = _run(mode, "frugal", functools.partial(self._whole_layer, [], once, once2), mean, var,
                                     *features, random=random)
            if stats is not None:
                norm_act.update_running_stats(self.norm2, stats, count)
            return out
        out = _run(mode, "efficient", self._concat_bn_relu_conv1, once, mean, var, *features)
        if self.bottleneck:
            mean, var, once = norm_act.prepare(self.norm2, [out], [], self.compiled)
            if mode == "efficient" and once is not None and torch.is_grad_enabled():
                # No concatenation here: a light Function that keeps only the input costs a fraction of a checkpoint.
                out = norm_act.BNReLUConv.apply(out, self.norm2.weight, self.norm2.bias, self.conv2.weight,
                                                self.norm2, self.conv2, once)
            else:
                out = _run(mode, "efficient", self._bn_relu_conv2, once, out, mean, var)
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

    def _concat_bn_relu_conv(self, once: norm_act.OneShot | None, mean: Tensor | None, var: Tensor | None,
                             *features: Tensor) -> Tensor:
        return self.conv(norm_act.bn_relu(self.norm, _cat(features), mean, var, self.compiled, once))

    def forward(self, features: Sequence[Tensor], shared: list[Stats | SyncedStats], mode: str = "plain") -> Tensor:
        # The pooling keeps nothing for backward, so no mode needs to keep or recompute the convolution's output.
        mean, var, once = norm_act.prepare(self.norm, features, shared, self.compiled)
        return avg_pool(_run(mode, "efficient", self._concat_bn_relu_conv, once, mean, var, *features))


COMPILE_SCOPES = ("layers", "model")


def _resolve_memory(memory: str | None, efficient: bool | None, memory_efficient: bool | None = None) -> str:
    """The one place where a memory mode is chosen from the arguments users pass (``efficient`` is the seed
    projects' spelling, ``memory_efficient`` torchvision's and timm's: True means 'efficient', False 'plain')."""
    if memory is not None and memory not in MEMORY_MODES:
        raise ValueError(f"memory must be one of {', '.join(map(repr, MEMORY_MODES))}, got {memory!r}")
    for name, value in (("efficient", efficient), ("memory_efficient", memory_efficient)):
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")
    if efficient is not None and memory_efficient is not None and efficient != memory_efficient:
        raise ValueError(f"efficient={efficient} contradicts memory_efficient={memory_efficient}; pass only one")
    flag, name = (efficient, "efficient") if efficient is not None else (memory_efficient, "memory_efficient")
    if flag is None:
        return memory or "efficient"
    if memory is not None and (memory == "plain") == flag:
        raise ValueError(f"memory={memory!r} contradicts {name}={flag}; pass only one of them")
    return memory or ("efficient" if flag else "plain")


def _resolve_compile(compile: bool | str) -> str | None:
    """The compile scope that ``compile=`` asks for: None, 'layers' (True) or 'model'."""
    if isinstance(compile, bool):
        return "layers" if compile else None
    if compile in COMPILE_SCOPES:
        return compile
    raise ValueError(f"compile must be True, False or one of {', '.join(map(repr, COMPILE_SCOPES))}, got {compile!r}")


def _check_config(growth_rate: int, block_config: Sequence[int], num_init_features: int, bn_size: int | None,
                  compression: float, drop_rate: float, head_drop_rate: float, num_classes: int,
                  in_chans: int, small_inputs: bool) -> None:
    def positive_int(name: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")

    def fraction(name: str, value: Any, low_open: bool) -> None:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not (0 < value <= 1 if low_open else 0 <= value < 1):
            raise ValueError(f"{name} must be a number in {'(0, 1]' if low_open else '[0, 1)'}, got {value!r}")

    positive_int("growth_rate", growth_rate)
    positive_int("num_init_features", num_init_features)
    positive_int("in_chans", in_chans)
    if bn_size is not None:
        positive_int("bn_size", bn_size)
    if isinstance(block_config, (str, bytes)) or not isinstance(block_config, Sequence) or not block_config:
        raise ValueError(f"block_config must be a non-empty sequence of layer counts, got {block_config!r}")
    for i, n in enumerate(block_config):
        positive_int(f"block_config[{i}]", n)
    fraction("compression", compression, low_open=True)
    fraction("drop_rate", drop_rate, low_open=False)
    fraction("head_drop_rate", head_drop_rate, low_open=False)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"num_classes must be a non-negative integer, got {num_classes!r}")
    if not isinstance(small_inputs, bool):
        raise ValueError(f"small_inputs must be True or False, got {small_inputs!r}")


class DenseNet(nn.Module):
    """DenseNet / DenseNet-BC with selectable memory mode.

    Args:
        growth_rate: new feature maps per dense layer (k).
        block_config: number of dense layers in each block.
        num_init_features: channels of the stem's output.
        bn_size: bottleneck width factor (DenseNet-BC: conv1x1 to bn_size*k first); None for plain DenseNet layers.
        drop_rate: dropout on each dense layer's new features.
        num_classes: classifier outputs; 0 for no classifier.
        memory_efficient: torchvision's and timm's spelling: True for 'efficient', False for 'plain'.

    The arguments above take torchvision's positional order; the rest are keyword-only:

        compression: fraction of channels a transition keeps (the paper's theta).
        head_drop_rate: dropout before the classifier.
        in_chans: input image channels.
        global_pool: 'avg', 'max' or '' (no pooling); any timm pool type works.
        small_inputs: one 3x3 stride-1 conv stem for 32x32 images instead of the ImageNet 7x7/2 conv + 3x3/2 max-pool.
        memory: 'plain', 'efficient' (default) or 'frugal'; see the module docstring.
        efficient: the seed projects' spelling: True for 'efficient', False for 'plain'.
        compile: True or 'layers' compiles the BN-ReLU segments, 'model' the whole model (see :meth:`set_compile`).
    """

    def __init__(
            self,
            growth_rate: int = 32,
            block_config: Sequence[int] = (6, 12, 24, 16),
            num_init_features: int = 64,
            bn_size: int | None = 4,
            drop_rate: float = 0.0,
            num_classes: int = 1000,
            memory_efficient: bool | None = None,
            *,
            compression: float = 0.5,
            head_drop_rate: float = 0.0,
            in_chans: int = 3,
            global_pool: str = "avg",
            small_inputs: bool = False,
            memory: str | None = None,
            efficient: bool | None = None,
            compile: bool | str = False,
    ) -> None:
        super().__init__()
        _check_config(growth_rate, block_config, num_init_features, bn_size, compression, drop_rate,
                      head_drop_rate, num_classes, in_chans, small_inputs)
        self.memory = _resolve_memory(memory, efficient, memory_efficient)
        compile_scope = _resolve_compile(compile)
        self.compiled: tuple[tuple[str, Any], ...] | None = None
        self.compile_scope: str | None = None
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
                if out_features < 1:
                    raise ValueError(f"compression={compression!r} leaves transition{i + 1} no channels (of "
                                     f"{num_features}); it must keep at least one")
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
        if compile_scope is not None:
            self.set_compile(scope=compile_scope)

    # --- memory modes and compilation ---
    def set_compile(self, enabled: bool = True, scope: str = "layers", **options: Any) -> DenseNet:
        """Compile with torch.compile; ``options`` go to it. Returns the model.

        * ``scope="layers"`` (regional, the default): the normalise-ReLU segments, as
          ``torch.compile(dynamic=True, fullgraph=True, **options)``. One graph serves every layer whatever the
          depth, so it compiles in seconds; convolutions and concatenations stay eager so checkpoint's early stop still
          skips convolutions when recomputing. It fuses BatchNorm and ReLU but keeps eager's per-layer host work.
        * ``scope="model"``: the whole model in place (``nn.Module.compile``), checkpoints inside. Inductor then
          launches fused kernels from one graph, which removes most per-op host work: the path for fast GPUs, where an
          eager DenseNet is host-bound. Compiling takes minutes for a deep model. ``mode="reduce-overhead"`` adds CUDA
          graphs (awaiting GPU evidence).

        Both keep BatchNorm running statistics exact (statistics are computed outside recomputed code) and gradients
        equal to eager within float32 tolerance. Norms synchronised across processes (``nn.SyncBatchNorm`` in training
        under torch.distributed) stay eager under ``scope="layers"``: their backward all-reduces.
        ``set_compile(False)`` returns to eager.
        """
        if scope not in COMPILE_SCOPES:
            raise ValueError(f"scope must be one of {', '.join(map(repr, COMPILE_SCOPES))}, got {scope!r}")
        self._compiled_call_impl = None  # nn.Module.compile's slot: undo a previous whole-model compile
        self.compiled = tuple(sorted(options.items())) if enabled and scope == "layers" else None
        for m in self.modules():
            if isinstance(m, (DenseLayer, Transition)):
                m.compiled = self.compiled
        self.compile_scope = scope if enabled else None
        if enabled and scope == "model":
            self.compile(**options)
        return self

    def set_memory(self, memory: str | None = None, efficient: bool | None = None) -> DenseNet:
        """Switch the memory mode of a built model; returns the model."""
        self.memory = _resolve_memory(memory, efficient)
        return self

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's switch (``--grad-checkpointing`` in its scripts): on selects 'frugal', the most memory-saving mode
        (the default, 'efficient', already checkpoints every BN-ReLU segment); off selects 'plain'."""
        self.memory = "frugal" if enable else "plain"

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
    def _stem_bn_relu(self, once: norm_act.OneShot | None, x: Tensor, mean: Tensor | None,
                      var: Tensor | None) -> Tensor:
        return norm_act.bn_relu(self.features.norm0, x, mean, var, self.compiled, once)

    def _whole_stem(self, cache: list[SyncedStats], pool: bool, once: norm_act.OneShot | None,
                    x: Tensor) -> tuple[Tensor, Stats | None, int | Tensor | None]:
        """conv0-BN-ReLU(-max-pool) as one recomputed segment (frugal); returns norm0's statistics and count for
        tracking outside it when it uses shared statistics (``cache``: see :func:`norm_act.segment_stats`)."""
        x = self.features.conv0(x)
        stats = count = None
        if once is None:
            stats, count = norm_act.segment_stats(self.features.norm0, x, cache)
            x = self._stem_bn_relu(None, x, *stats)
        else:
            x = self._stem_bn_relu(once, x, None, None)
        return max_pool(x) if pool else x, stats, count

    def _final(self, once: norm_act.OneShot | None, mean: Tensor | None, var: Tensor | None,
               *features: Tensor) -> Tensor:
        return norm_act.bn_relu(self.features.norm5, _cat(features), mean, var, self.compiled, once)

    def _forward(self, x: Tensor, taps: Collection[int] = (), stop: int | None = None) -> tuple[Tensor, list[Tensor]]:
        """Feature map ``stop`` (``feature_info`` numbering; default the last the network has) and the maps
        numbered in ``taps``; nothing after map ``stop`` is computed."""
        if trace.is_tracing():  # torch.fx, torch.export, ONNX, torch.jit.trace: the plain model's graph
            return trace.forward_traceable(self, x, taps, stop)
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
                once = norm_act.inner_once(norm0, self.compiled)
                x, stats, count = _run(mode, "frugal", functools.partial(self._whole_stem, [], pool_inside, once), x)
                if stats is not None:
                    norm_act.update_running_stats(norm0, stats, count)
            else:
                x = self.features.conv0(x)
                mean, var, once = norm_act.prepare(norm0, [x], [], self.compiled)
                x = _run(mode, "efficient", self._stem_bn_relu, once, x, mean, var)
            if not pool_inside:
                if 0 in taps:
                    tapped.append(x)
                if stop == 0:
                    return x, tapped
                x = max_pool(x)
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
        mean, var, once = norm_act.prepare(self.features.norm5, features, shared, self.compiled)
        x = _run(mode, "efficient", self._final, once, mean, var, *features)
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

    def __prepare_scriptable__(self) -> nn.Module:
        """torch.jit.script calls this first: say plainly that scripting is not supported."""
        raise RuntimeError(trace.SCRIPTING_UNSUPPORTED)

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
        if not isinstance(global_pool, str):
            raise ValueError(f"global_pool must be a timm pool type such as 'avg', 'max' or '', got {global_pool!r}")
        try:
            pool, classifier = create_classifier(self.num_features, num_classes, pool_type=global_pool)
        except (AssertionError, ValueError, NotImplementedError) as e:  # timm asserts on unknown pool types
            raise ValueError(f"global_pool={global_pool!r} is not a timm pool type (e.g. 'avg', 'max', "
                             f"'avgmax', 'catavgmax', ''): {e}") from None
        self.num_classes = num_classes
        self.global_pool, self.classifier = pool, classifier
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
