"""DenseNet and DenseNet-BC, for 1, 2 or 3 spatial dims, with exact memory-efficient dense layers.

Huang et al., "Densely Connected Convolutional Networks" (2017); Pleiss et al., "Memory-Efficient Implementation of
DenseNets" (2017). Module names, state-dict keys and fx nodes are torchvision's, so its weights and tools apply.

Six ideas:

1. **Maps stay apart.** A block keeps the list of its maps (its input and each layer's new features) and never
   concatenates them itself: the norm that reads them concatenates inside its own segment.
2. **Segments.** What a segment makes is rebuilt in backward rather than kept: a concat-norm-ReLU-conv, or the stem's
   conv-norm-ReLU-pool (:mod:`effidense.layers.light`: a light autograd Function for BatchNorm-ReLU, else a
   checkpoint), or a whole layer and the final norm, under non-reentrant ``torch.utils.checkpoint``
   (:func:`~effidense.layers.recompute.checkpointed`).
3. **The exact norm** (:mod:`effidense.layers.norm`): running statistics are updated on a segment's first run only,
   and a rerun reproduces that run bitwise. Its activation is a module after it (``relu1``), as in torchvision.
4. **The memory mode** (``memory=``), set on every layer, which each layer reads: ``plain`` recomputes nothing;
   ``efficient`` makes every concat-norm-ReLU feeding a convolution or pool a segment, and the ImageNet stem one
   (its convolution's output is the largest map a DenseNet makes); ``frugal`` adds whole dense layers, so only each
   layer's new features and each block's input stay, and its sliced layers sum each map's gradient in one place
   (:class:`~effidense.layers.gather.GradSlot`) rather than leave autograd a second set to add. A block's last layer
   and a sliced transition after it are one segment: the transition's forward, which must hold its norm's and
   convolution's outputs for the whole batch, drops the layer's features once normalised.
5. **Pools that keep nothing** (:mod:`effidense.layers.pool`): their backward needs only shapes and argmax indices.
6. **One forward.** Tracers (fx, torch.export, ONNX, ``jit.trace``) and hooks run the same forward; segments then
   simply run, and a traced or hooked block hands on its concatenation, as torchvision's does.
"""
from __future__ import annotations

import functools
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from timm.layers import create_classifier
from timm.models._features import feature_take_indices
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .arguments import (
    MEMORY_MODES,
    check_block,
    check_compile,
    check_config,
    check_input,
    check_layer,
    check_transition,
    min_input_size,
    resolve_memory,
)
from .layers.gather import gathered, read_through
from .layers.light import (
    cat_maps,
    concat_norm_conv,
    concat_norm_conv_pool,
    conv_norm_pool,
    light_segment,
    runs_light,
    saved_only,
)
from .layers.masks import ReluKeepingSign
from .layers.mode import SCRIPTING_UNSUPPORTED, MemoryMode
from .layers.norm import ActLayer, AdoptsNorms, NormLayer, norm_and_act, normalize_maps
from .layers.pool import AvgPool, MaxPool
from .layers.recompute import backward_hooked, checkpointed, hooked, is_tracing, recomputing, replay, run_mode

__all__ = ["DenseNet", "DenseLayer", "DenseBlock", "Transition", "MemoryMode", "MEMORY_MODES", "SCRIPTING_UNSUPPORTED"]

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def _conv(spatial_dims: int, in_channels: int, out_channels: int, kernel: int, stride: int = 1) -> nn.Module:
    return _CONV[spatial_dims](in_channels, out_channels, kernel, stride=stride, padding=kernel // 2, bias=False)


def _as_maps(maps: Sequence[Tensor] | Tensor) -> Sequence[Tensor]:
    """A layer's input as a list of maps: one tensor is one map (``model.features(x)`` runs the layers in turn)."""
    return [maps] if isinstance(maps, (Tensor, torch.fx.Proxy)) else maps


def _handoff(module: nn.Module, value: Any = None) -> Any:
    """A one-shot value beside a module's call, for its forward: set with ``value``, taken (and cleared) without.
    Kept in ``__dict__``, never a submodule, buffer or state."""
    if value is not None:
        module.__dict__["_handoff"] = value
        return None
    return module.__dict__.pop("_handoff", None)


class DenseLayer(MemoryMode, AdoptsNorms):
    """BN-ReLU-conv3x3 (DenseNet) or BN-ReLU-conv1x1-BN-ReLU-conv3x3 (DenseNet-BC, ``bn_size``) on the concatenation
    of the maps it is given (a list, or one tensor); returns its new features. Modules by torchvision's names:
    ``norm1``, ``relu1``, ``conv1``, ``norm2``, ``relu2``, ``conv2``. ``drop_channels``: dropout drops whole channels
    (``F.dropout2d``/``3d``, as MONAI's). ``block_shape``: its block's input channels and number of layers, which
    ``backward_slices='auto'`` weighs a rerun against (a :class:`DenseBlock` sets it; alone, the layer is its block)."""

    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int | None = 4, drop_rate: float = 0.0,
                 spatial_dims: int = 2, memory: str = "efficient", norm_layer: NormLayer | None = None,
                 drop_channels: bool = False, act_layer: ActLayer | None = None) -> None:
        super().__init__()
        check_layer(num_input_features, growth_rate, bn_size, drop_rate, spatial_dims)
        self.norm1, self.relu1 = norm_and_act(norm_layer, act_layer, num_input_features, spatial_dims)
        width = bn_size * growth_rate if bn_size else growth_rate
        self.conv1 = _conv(spatial_dims, num_input_features, width, 1 if bn_size else 3)
        if bn_size:
            self.norm2, self.relu2 = norm_and_act(norm_layer, act_layer, width, spatial_dims)
            self.conv2 = _conv(spatial_dims, width, growth_rate, 3)
        self.bottleneck = bool(bn_size)
        # channels in, of the bottleneck (0: none) and out, for the slicing policy: the convolutions may be wrapped
        self.widths = num_input_features, width if bn_size else 0, growth_rate
        self.block_shape = num_input_features, 1  # its block's input channels and layers (a block sets its own)
        self.drop_rate = drop_rate
        self.dropout = (F.dropout1d, F.dropout2d, F.dropout3d)[spatial_dims - 1] if drop_channels else F.dropout
        self.memory = memory

    def new_features(self, *maps: Tensor, light: bool = False, slices: int = 1) -> Tensor:
        """The layer's new features from ``maps``; ``light``: each norm-ReLU-conv keeps only its input for backward,
        which goes through ``slices`` of the batch, and the last draws its dropout's mask again rather than keep it."""
        dropout = self._drawn_dropout()
        out = concat_norm_conv(self.norm1, self.relu1, self.conv1, *maps, light=light, slices=slices,
                               dropout=None if self.bottleneck else dropout)
        if self.bottleneck:
            out = concat_norm_conv(self.norm2, self.relu2, self.conv2, out, light=light, slices=slices,
                                   dropout=dropout)
        return out

    def _frugal_slices(self, maps: Sequence[Tensor]) -> int:
        inputs, bottleneck, _ = self.widths
        return self.slices(maps, 3 * (1 + bottleneck / inputs), self._block_keeps())

    def gathers(self, maps: Sequence[Tensor]) -> bool:
        """Whether the layer's segment, on ``maps``, goes through the batch in slices and gathers the gradients of
        the maps it reads where their makers take them (:class:`~effidense.layers.gather.GradSlot`): frugal's, not
        hooked."""
        return run_mode(self.memory) == "frugal" and torch.is_grad_enabled() and not hooked(self) and \
            not is_tracing() and self._frugal_slices(maps) > 1

    def _block_keeps(self) -> float:
        """What this mode keeps for the layer's whole block, over what the layer reads (both are maps of one size):
        the block's input and every layer's new features, and in efficient mode every layer's bottleneck too. 'auto'
        slices a rerun that would hold more than that: an efficient DenseNet-BC layer's never does (its bottlenecks
        keep more), a layer without a bottleneck's (FC-DenseNet's) does, as frugal's do."""
        (block_input, layers), (inputs, bottleneck, growth) = self.block_shape, self.widths
        growth += bottleneck if self.memory == "efficient" else 0
        return (block_input + layers * growth) / inputs

    def stages(self) -> list[tuple[nn.Module, nn.Module, nn.Module]]:
        """Each norm, its activation and the convolution after it, in turn."""
        first = (self.norm1, self.relu1, self.conv1)
        return [first, (self.norm2, self.relu2, self.conv2)] if self.bottleneck else [first]

    def _drawn_dropout(self) -> Callable[[Tensor], Tensor] | None:
        """The dropout this forward draws, in training mode whatever the mode when backward draws its mask again (after
        ``model.eval()``); None in eval mode or at a drop rate of 0."""
        return functools.partial(self.dropout, p=self.drop_rate, training=True) \
            if self.training and self.drop_rate > 0 else None

    def forward(self, maps: Sequence[Tensor] | Tensor) -> Tensor:
        maps, mode = _as_maps(maps), run_mode(self.memory)
        if isinstance(maps[0], torch.fx.Proxy):  # a graph node for the concatenation, torchvision's ``cat``
            maps = [torch.cat(maps, 1)]
        if mode == "plain":
            return self.new_features(*maps)
        if mode == "efficient":
            return self.new_features(*maps, light=True, slices=self.slices(maps, 3.0, self._block_keeps()))
        # frugal: the whole layer is a segment, its dropout included
        dropout = self._drawn_dropout()
        out = light_segment(self.stages(), *maps, slices=self._frugal_slices(maps), dropout=dropout,
                            gather=not hooked(self))
        if out is not None:
            return out
        return checkpointed(True, self.new_features, *maps, random=dropout is not None)


class DenseBlock(MemoryMode, nn.ModuleDict):
    """``num_layers`` dense layers, each fed every map before it: a building block for models of your own.

    ``forward(x)`` returns the concatenation of ``x`` and every layer's new features, or only the new features with
    ``new_features_only=True`` (the up-path of FC-DenseNet, "Tiramisu"); exact in every memory mode (``memory``,
    settable). :meth:`run` keeps the maps apart, for a next segment that concatenates them in its own rerun.
    """

    def __init__(self, num_layers: int, num_input_features: int, growth_rate: int, bn_size: int | None = 4,
                 drop_rate: float = 0.0, spatial_dims: int = 2, memory: str = "efficient",
                 new_features_only: bool = False, norm_layer: NormLayer | None = None, drop_channels: bool = False,
                 backward_slices: int | str | None = "auto", act_layer: ActLayer | None = None) -> None:
        super().__init__()
        check_block(num_layers, num_input_features, growth_rate, bn_size, drop_rate, spatial_dims)
        for i in range(num_layers):
            self.add_module(f"denselayer{i + 1}", DenseLayer(
                num_input_features + i * growth_rate, growth_rate, bn_size, drop_rate, spatial_dims, memory,
                norm_layer, drop_channels, act_layer))
        for layer in self.values():
            layer.block_shape = num_input_features, num_layers
        self.new_features_only = new_features_only
        self.memory, self.backward_slices = memory, backward_slices

    def run(self, maps: Sequence[Tensor], last: bool = True) -> list[Tensor]:
        """The maps given, then each layer's new features (the last layer's only with ``last``). Where the first layer
        gathers its maps' gradients (a sliced frugal block), the maps given get slots for theirs too."""
        maps = list(maps)
        layers = list(self.values())
        if layers[0].gathers(maps):
            maps = [gathered(m) for m in maps]
        for layer in layers if last else layers[:-1]:
            # each layer its own list: a checkpoint put around a layer (FSDP's apply_activation_checkpointing)
            # reruns it on the very list it was given
            maps.append(layer(list(maps)))
        return maps

    def forward(self, x: Tensor) -> Tensor:
        apart = _handoff(self)
        given = apart is not None and apart[0] is x  # called by run_hooked: the maps x concatenates stay apart
        maps = self.run(apart[1] if given else [x])
        out = cat_maps(maps[1:] if self.new_features_only else maps)
        if given:
            _handoff(self, (out, maps))
        return out

    def run_hooked(self, maps: Sequence[Tensor]) -> list[Tensor]:
        """:meth:`run` through a call of the block, so that its hooks fire and see what torchvision's see, while the
        maps stay apart: a hook costs no memory beyond what it holds, and later readers' gradients pass through the
        output it saw (:func:`~effidense.layers.gather.read_through`). A hook that replaces a value is obeyed."""
        x = cat_maps(maps)
        _handoff(self, (x, list(maps)))
        try:
            out = self(x)
            handed = _handoff(self)
        finally:
            _handoff(self)
        if handed is None or handed[0] is not out:
            return [out]
        maps, skipped = handed[1], 1 if self.new_features_only else 0
        return maps[:skipped] + read_through(out, maps[skipped:])


class Transition(MemoryMode, AdoptsNorms):
    """BN-ReLU-conv1x1-avgpool between dense blocks (``norm``, ``relu``, ``conv``, ``pool``), on the concatenation
    of the maps it is given (a list, or one tensor)."""

    def __init__(self, num_input_features: int, num_output_features: int, spatial_dims: int = 2,
                 memory: str = "efficient", norm_layer: NormLayer | None = None,
                 act_layer: ActLayer | None = None) -> None:
        super().__init__()
        check_transition(num_input_features, num_output_features, spatial_dims)
        self.norm, self.relu = norm_and_act(norm_layer, act_layer, num_input_features, spatial_dims)
        self.conv = _conv(spatial_dims, num_input_features, num_output_features, 1)
        self.widths = num_input_features, num_output_features  # the convolution's, which may be wrapped
        self.pool = AvgPool(spatial_dims)
        self.memory = memory

    def forward(self, maps: Sequence[Tensor] | Tensor, frees: int = 0) -> Tensor:
        """``frees``: a sliced rerun empties the last ``frees`` maps once it has normalised them (they must be read by
        nothing else, and rebuilt for its backward: :meth:`DenseNet._last_layer_then`)."""
        # The pool keeps nothing for backward, so no mode needs to keep or recompute the convolution's output. The
        # rerun is weighed as a dense layer's: the first transition reads the largest concatenation a DenseNet makes,
        # and its forward, which holds it whole, should set the peak, not its backward. Where the forward empties a
        # map, its backward, which holds every map and their gradients, would set it instead: it is weighed twice.
        maps, light = _as_maps(maps), run_mode(self.memory) != "plain"
        slices = self.conv_slices(maps, self.widths, 2 if frees else 1) if light else 1
        return concat_norm_conv_pool(self.norm, self.relu, self.conv, self.pool, *maps, light=light, slices=slices,
                                     frees=frees)

    def frees_after(self, layer: DenseLayer, maps: Sequence[Tensor], gradients: int) -> bool:
        """Whether this transition and ``layer`` before it, on ``maps`` (all but the layer's), run as one segment in
        which the transition empties the layer's new features once normalised: frugal, sliced, both light (a layer
        that is not runs a checkpoint of its own, which in the segment's rerun would run as a first run), with no hooks
        and no parametrised weights (the rerun would make them again, a step's spectral norm twice), and where those
        features outweigh ``gradients`` (bytes), which the segment's rerun in backward holds beside the maps, as the
        forward did not."""
        features = maps[-1].numel() // maps[-1].shape[1] * layer.widths[2] * maps[-1].element_size()
        return features > gradients and run_mode(self.memory) == "frugal" and run_mode(layer.memory) == "frugal" \
            and not any(hooked(m) or parametrize.is_parametrized(m) for module in (self, layer)
                        for m in module.modules()) and \
            runs_light(self.norm, self.relu, self.conv) and all(runs_light(*stage) for stage in layer.stages()) and \
            self.conv_slices(maps, self.widths) > 1


class _Features(AdoptsNorms, nn.Sequential):
    """``features``: the stem, blocks, transitions and final norm, by torchvision's names; called, it runs them in
    turn, as torchvision's. Called by its model, it takes the model's path, so that hooks on it cost no memory."""

    def forward(self, x: Tensor) -> Tensor:
        path = _handoff(self)
        return path(x) if path is not None else super().forward(x)


class DenseNet(MemoryMode):
    """DenseNet / DenseNet-BC with selectable memory mode, for images (``spatial_dims=2``), volumes (3) or signals (1).

    Positional, in torchvision's order: ``growth_rate`` (k), ``block_config`` (dense layers per block),
    ``num_init_features`` (the stem's channels), ``bn_size`` (bottleneck width factor of DenseNet-BC; None for the
    original BN-ReLU-conv3x3 layer), ``drop_rate`` (dropout on each layer's new features), ``num_classes`` (0: no
    classifier), ``memory_efficient`` (torchvision's and timm's spelling: True for 'efficient', False for 'plain').

    Keyword-only: ``compression`` (fraction of channels a transition keeps), ``head_drop_rate``, ``in_chans``,
    ``global_pool`` (any timm pool type; '' for none), ``small_inputs`` (one 3x3 stride-1 conv stem for 32x32 images),
    ``memory`` ('plain', 'efficient' (default) or 'frugal'; the module docstring), ``efficient`` (the seed projects'
    spelling), ``compile`` (see :meth:`set_compile`), ``spatial_dims``, ``norm_layer`` and ``act_layer`` (each norm
    and the activation after it, as timm's: names such as 'batchnorm', 'groupnorm', 'silu', or what makes them;
    :func:`~effidense.layers.norm.norm_and_act`; default BatchNorm and in-place ReLU), ``drop_channels``
    (dropout drops whole channels, as MONAI's), ``backward_slices`` ('auto': a rerun goes through the batch in slices
    where it would hold more than 32 MiB and more than the mode keeps beside it: frugal's, and efficient's dense layers
    without a bottleneck; a number of slices for every rerun of efficient and frugal, 1 for none sliced; None as 1,
    but ``timm.create_model`` drops it), ``device`` and ``dtype`` (where the parameters and buffers are made and their
    floating-point type, as timm's models take them; ``device="meta"`` makes shapes only).
    """

    def __init__(self, growth_rate: int = 32, block_config: Sequence[int] = (6, 12, 24, 16),
                 num_init_features: int = 64, bn_size: int | None = 4, drop_rate: float = 0.0, num_classes: int = 1000,
                 memory_efficient: bool | None = None, *, compression: float = 0.5, head_drop_rate: float = 0.0,
                 in_chans: int = 3, global_pool: str = "avg", small_inputs: bool = False, memory: str | None = None,
                 efficient: bool | None = None, compile: bool | str = False, spatial_dims: int = 2,
                 norm_layer: NormLayer | None = None, drop_channels: bool = False,
                 backward_slices: int | str | None = "auto", act_layer: ActLayer | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        check_config(growth_rate, block_config, num_init_features, bn_size, compression, drop_rate,
                     head_drop_rate, num_classes, in_chans, small_inputs, spatial_dims)
        mode = resolve_memory(memory, efficient, memory_efficient)
        check_compile(compile)
        self.num_classes, self.in_chans, self.small_inputs = num_classes, in_chans, small_inputs
        self.block_config, self.spatial_dims = tuple(block_config), spatial_dims
        dims, layers = spatial_dims, dict(norm_layer=norm_layer, act_layer=act_layer)
        if small_inputs:
            stem = [("conv0", _conv(dims, in_chans, num_init_features, 3))]
        else:
            norm0, relu0 = norm_and_act(norm_layer, act_layer, num_init_features, dims)
            stem = [("conv0", _conv(dims, in_chans, num_init_features, 7, stride=2)), ("norm0", norm0),
                    ("relu0", relu0), ("pool0", MaxPool(dims))]
        self.features = _Features(OrderedDict(stem))
        reduction, channels = 1 if small_inputs else 4, num_init_features
        self.feature_info = [dict(num_chs=channels, reduction=reduction // 2 or 1,
                                  module="features.conv0" if small_inputs else "features.relu0")]
        for i, num_layers in enumerate(block_config, 1):
            self.features.add_module(f"denseblock{i}", DenseBlock(
                num_layers, channels, growth_rate, bn_size, drop_rate, dims, drop_channels=drop_channels,
                **layers))
            channels += num_layers * growth_rate
            if i < len(block_config):
                self.feature_info.append(dict(num_chs=channels, reduction=reduction, module=f"features.denseblock{i}"))
                if int(channels * compression) < 1:
                    raise ValueError(f"compression={compression!r} leaves transition{i} no channels (of "
                                     f"{channels}); it must keep at least one")
                self.features.add_module(f"transition{i}", Transition(
                    channels, int(channels * compression), dims, **layers))
                channels, reduction = int(channels * compression), reduction * 2
        # The ReLU after the final norm: torchvision's forward applies it outside ``features``, and fx names it 'relu'.
        norm5, self.relu = norm_and_act(norm_layer, act_layer, channels, dims)
        self.features.add_module("norm5", norm5)
        self.feature_info.append(dict(num_chs=channels, reduction=reduction, module="relu"))
        self.num_features = channels
        self._last_index = len(block_config)  # the last feature_info map the network computes (lowered by pruning)
        self._create_head(num_classes, global_pool)
        self.head_drop = nn.Dropout(head_drop_rate)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.modules.conv._ConvNd):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
        self.memory, self.backward_slices = mode, backward_slices
        if device is not None or dtype is not None:  # initialised as on the CPU in float32: the same weights
            self.to(device=device, dtype=dtype)
        if compile:
            self.set_compile()

    def set_memory(self, memory: str | None = None, efficient: bool | None = None) -> DenseNet:
        """Switch the memory mode of a built model; returns the model."""
        self.memory = resolve_memory(memory, efficient)
        return self

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's switch (``--grad-checkpointing``): on selects 'frugal', the most memory-saving mode; off the
        default, 'efficient', which already recomputes every BN-ReLU segment (``set_memory('plain')`` keeps all)."""
        self.memory = "frugal" if enable else "efficient"

    def set_compile(self, enabled: bool = True, scope: str = "model", **options: Any) -> DenseNet:
        """Compile the whole model in place (``nn.Module.compile(**options)``), checkpoints and light Functions
        inside; ``set_compile(False)`` returns to eager. Returns the model. It pays where an eager DenseNet is
        host-bound (fast GPUs) and takes minutes to compile a deep model: ``effidense bench --compile`` compares each
        compiled mode with its eager self. Running statistics stay exact; gradients equal eager's within float32
        tolerance. ``scope`` accepts only ``"model"``."""
        check_compile(scope, "scope")
        self._compiled_call_impl = None  # nn.Module.compile's slot: undo a previous compile
        if enabled:
            self.compile(**options)
        return self

    @property
    def min_input_size(self) -> int:
        """Smallest size along each spatial axis the network accepts (every block must see at least one position)."""
        return min_input_size(self._last_index, self.small_inputs)

    # --- forward ---
    def _maps(self, x: Tensor, stem_map: bool = False, activate: bool = True,
              last_only: bool = False) -> Iterator[Sequence[Tensor]]:
        """Feature maps in ``feature_info`` order, each as the maps it concatenates; nothing after the map where the
        caller stops is computed. ``stem_map``: map 0 is wanted (else the stem's pool may run inside its segment, and
        map 0 is then the pooled one). ``activate=False``: the last map before the final ReLU (``features``').
        ``last_only``: only the last map is read, so a block whose last layer runs with the transition after it
        (:meth:`Transition.frees_after`) yields nothing. A caller may replace a yielded list's maps in place, for what
        comes after to read instead."""
        mode, f, tracing = run_mode(self.memory), self.features, is_tracing()
        if self.small_inputs:
            x = f.conv0(x)
        elif mode != "plain" and not stem_map:  # the rerun holds 3 maps of the convolution's output
            growth = 3 * self.feature_info[0]["num_chs"] / self.in_chans / 2 ** self.spatial_dims
            x = conv_norm_pool(f.conv0, f.norm0, f.relu0, f.pool0, x, slices=self.slices([x], growth))
        else:
            x = checkpointed(mode != "plain", lambda t: f.relu0(f.norm0(f.conv0(t))), x)
        yield [x]
        maps = [f.pool0(x) if not self.small_inputs and (stem_map or mode == "plain") else x]
        held = None  # a block's last layer, run with the transition after it
        # what the rerun of such a layer holds in backward beside the maps, as forward did not
        gradients = sum(p.numel() * p.element_size() for p in self.parameters()) if last_only and mode == "frugal" \
            else 0
        for i in range(1, self._last_index + 1):
            if i > 1:
                transition = f.get_submodule(f"transition{i - 1}")
                # a backward hook's input gradient is the concatenation's, as torchvision's
                given = cat_maps(maps) if backward_hooked(transition) else maps
                maps = [transition(given) if held is None else checkpointed(
                    True, functools.partial(self._last_layer_then, transition, held), *maps,
                    random=held._drawn_dropout() is not None)]
            block, held = f.get_submodule(f"denseblock{i}"), None
            # Traced graphs and hooks take the block's own forward: its output is the node named after the block.
            if tracing or hooked(block):
                maps = [block(cat_maps(maps))] if tracing else block.run_hooked(maps)
            else:
                holds = last_only and mode == "frugal" and i < self._last_index
                maps = block.run(maps, last=not holds)
                if holds:
                    held = list(block.values())[-1]
                    if not f.get_submodule(f"transition{i}").frees_after(held, maps, gradients):
                        maps.append(held(list(maps)))
                        held = None
            if i == len(self.block_config):
                yield [checkpointed(mode != "plain", functools.partial(self._final, activate), *maps)]
                return
            if held is None:
                yield maps

    @staticmethod
    def _last_layer_then(transition: Transition, layer: DenseLayer, *maps: Tensor) -> Tensor:
        """A block's last ``layer`` on ``maps``, then ``transition`` on them and its new features, which it empties
        once normalised: frugal's forward then never holds a block's every map beside the transition's output. Run as
        one checkpoint, whose rerun rebuilds the layer's features and saves what the transition's backward reads."""
        maps = [*maps, layer(list(maps))]
        if not recomputing():
            return transition(maps, frees=1)
        replay(transition)  # not called in the rerun, its weights are still those forward was given
        return saved_only(maps, [(transition.norm, transition.relu, transition.conv)])

    def _final(self, activate: bool, *maps: Tensor) -> Tensor:
        x = normalize_maps(self.features.norm5, *maps)
        return self._final_relu(x) if activate else x

    def _final_relu(self, x: Tensor) -> Tensor:
        relu = self._modules.get("relu")  # None where a head of its own applies it (MONAI's class_layers.relu)
        return x if relu is None else relu(x)

    def _check_input(self, x: Tensor, last_index: int) -> None:
        if not (isinstance(x, torch.fx.Proxy) or torch.jit.is_tracing()):  # there shapes are graph values
            check_input(tuple(x.shape), self.spatial_dims, self.in_chans, last_index, self.small_inputs)

    def _features(self, x: Tensor, activate: bool = True) -> Tensor:
        self._check_input(x, self._last_index)
        return cat_maps(deque(self._maps(x, activate=activate, last_only=True), maxlen=1)[0])  # dropping the rest

    def forward_features(self, x: Tensor) -> Tensor:
        if not (hooked(self.features) and self._last_index == len(self.block_config)):
            return self._features(x)
        if is_tracing():
            return self._final_relu(self.features(x))
        # Hooks on ``features`` see it called, as torchvision's forward calls it, and it takes this model's path; the
        # final ReLU then keeps its output's sign, not the output, as the final segment would keep nothing.
        _handoff(self.features, functools.partial(self._features, activate=False))
        try:
            x = self.features(x)
        finally:
            _handoff(self.features)
        relu = self._modules.get("relu")
        light = type(relu) is nn.ReLU and run_mode(self.memory) != "plain" and not hooked(relu)
        return ReluKeepingSign.apply(relu, x) if light else self._final_relu(x)

    def forward_intermediates(self, x: Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False,
                              ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """timm's feature API: index 0 is the stem's map, 1..n-1 each block's output before its transition,
        n the final norm's output. With ``stop_early`` the returned final map is the last one asked for.
        ``norm`` is accepted for timm's sake; the last map is already normalised."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        stop = max_index if stop_early or intermediates_only else self._last_index
        self._check_input(x, stop)
        wanted, intermediates = set(take_indices), []
        for i, maps in enumerate(self._maps(x, stem_map=0 in wanted)):
            if i in wanted or i == stop:
                x = cat_maps(maps)
                if i in wanted:
                    intermediates.append(x)
                    if i < stop and len(maps) > 1:
                        # later layers read the maps through it, as timm's read the map itself: a gradient with
                        # respect to it (Grad-CAM's) is the whole network's, and only the maps are kept
                        maps[:] = read_through(x, maps)
            if i == stop:
                break
        return intermediates if intermediates_only else (x, intermediates)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if isinstance(x, torch.fx.Proxy) and self._pools_like_torchvision():
            # The same average pooling as torchvision's functions, for its node names in fx graphs
            # ('adaptive_avg_pool2d', 'flatten'); eager calls global_pool, so hooks on it fire.
            x = self.head_drop(torch.flatten(F.adaptive_avg_pool2d(x, (1, 1)), 1))
            return x if pre_logits else self.classifier(x)
        if self.spatial_dims != 2 and not self.global_pool.is_identity():
            x = x.flatten(2).unsqueeze(2)  # timm's global pools are 2D: every position in one row
        x = self.head_drop(self.global_pool(x))
        return x if pre_logits else self.classifier(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def _pools_like_torchvision(self) -> bool:
        pool = self.global_pool
        return self.spatial_dims == 2 and getattr(pool, "pool_type", None) == "avg" and \
            type(getattr(pool, "pool", None)) is nn.AdaptiveAvgPool2d and type(pool.flatten) is nn.Flatten

    # --- timm model API ---
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        blocks = r"^features\.(?:denseblock|transition)(\d+)" if coarse else [
            (r"^features\.denseblock(\d+)\.denselayer(\d+)", None), (r"^features\.transition(\d+)", (99999,)),
            (r"^features\.norm5", (99999,))]
        return dict(stem=r"^features\.conv0|^features\.norm0", blocks=blocks)

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
        self.num_classes, self.global_pool, self.classifier = num_classes, pool, classifier
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """New classifier for ``num_classes`` (0: none), optionally with a new pooling type."""
        pool_type = self.global_pool.pool_type if global_pool is None else global_pool
        self._create_head(num_classes, pool_type)
        weight = self.features.conv0.weight
        self.classifier.to(device=weight.device, dtype=weight.dtype)
        self.global_pool.train(self.training)
        self.classifier.train(self.training)

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the layers that feature maps ``indices`` do not need (timm's ``features_only``): the network then ends
        at the last wanted map; the head goes with ``prune_head`` or whenever the end moved (the classifier was sized
        for the final features). Returns the kept indices."""
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        if max_index > self._last_index:
            raise ValueError(f"feature map {max_index} was already pruned away (the network ends at map "
                             f"{self._last_index})")
        last = len(self.block_config)
        if max_index < self._last_index:
            dropped = [f"denseblock{i}" for i in range(max_index + 1, last + 1)]
            dropped += [f"transition{i}" for i in range(max(max_index, 1), last)] + ["norm5"]
            for module, name in [(self.features, name) for name in dropped] + [(self, "relu")]:
                module._modules.pop(name, None)
            self._last_index = max_index
            self.num_features = self.feature_info[max_index]["num_chs"]
        if prune_head or max_index < last:
            self.reset_classifier(0, "")
        return take_indices
