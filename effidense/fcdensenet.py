"""FC-DenseNet ("Tiramisu"), for dense prediction (segmentation) on images, volumes or signals, in every memory mode.

Jégou et al., "The One Hundred Layers Tiramisu: Fully Convolutional DenseNets for Semantic Segmentation" (2017).
A 3x3 convolution of 48 channels, a down path of dense blocks (BN-ReLU-conv3x3-dropout layers, no bottleneck) each
followed by a transition down (BN-ReLU-conv1x1-dropout-max-pool 2), a bottleneck block, then an up path: a 3x3
stride-2 transposed convolution of the previous block's new features, centre-cropped to the skip and concatenated
with it, and a dense block. Blocks below the top of the up path hand on only their new features; the last block's
whole stack goes to the 1x1 classifier.

Built from :class:`~effidense.densenet.DenseBlock`, so the memory mode (``memory=``) is the DenseNet's:

* ``plain``: nothing is recomputed.
* ``efficient``: each dense layer (one BN-ReLU-conv-dropout here) is a segment that keeps only its input maps, its
  dropout's mask drawn again in backward; the transitions down, the transitions up and the classifier each run as
  one segment that keeps only the maps it reads (the skips and new features, which stay anyway), so no
  concatenation of them is ever kept: maps stay apart from block to block.
* ``frugal``: the same as efficient here (a layer has no bottleneck to rerun), but the transitions down go through
  their reruns a slice of the batch at a time, keeping their dropout's masks (a bit a value), and each map's gradient
  is summed in one place.

Both go through a layer's large rerun a slice of the batch at a time (``backward_slices='auto'``: one that would hold
more than its block keeps, as every layer without a bottleneck's would, and more than 32 MiB). Every mode computes the
plain model's function, outputs and BatchNorm running statistics bitwise (they are updated once, and a rerun with
dropout draws the mask forward drew), gradients bitwise where not sliced and up to the order of float sums where
sliced.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .arguments import check_counts, check_positive, check_spatial_dims
from .densenet import DenseBlock, MemoryMode
from .layers import checkpointed
from .layers.gather import slots_of
from .layers.light import (
    PooledConv,
    as_conv_sees,
    autocast_state,
    cat_maps,
    light_segment,
    torch_conv,
)
from .layers.masks import pack_bits, random_state, replayed, unpack_bits
from .layers.norm import ActLayer, AdoptsNorms, NormLayer, norm_and_act, normalize_maps
from .layers.pool import max_pool_input_grad
from .layers.recompute import differentiable_rerun, hooked, is_tracing, run_mode

__all__ = ["FCDenseNet", "FCDENSENET_CONFIGS", "fcdensenet56", "fcdensenet67", "fcdensenet103"]

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_UP = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}

# The paper's table: growth rate and layers per block (down path, bottleneck, up path), first convolution 48.
FCDENSENET_CONFIGS: dict[str, dict[str, Any]] = {
    "fcdensenet56": dict(growth_rate=12, down_blocks=(4,) * 5, bottleneck_layers=4, up_blocks=(4,) * 5),
    "fcdensenet67": dict(growth_rate=16, down_blocks=(5,) * 5, bottleneck_layers=5, up_blocks=(5,) * 5),
    "fcdensenet103": dict(growth_rate=16, down_blocks=(4, 5, 7, 10, 12), bottleneck_layers=15,
                          up_blocks=(12, 10, 7, 5, 4)),
}


class TransitionDown(MemoryMode, AdoptsNorms):
    """BN-ReLU-conv1x1-dropout-max-pool 2 (``norm``, ``relu``, ``conv``) on the concatenation of the maps it is
    given. Outside plain mode it is one segment: the concatenation, the convolution's output and the pool's input
    are rebuilt in backward rather than kept (each is as large as the skip it reads). In frugal mode, where its rerun
    would hold more than 32 MiB (``backward_slices``, as DenseNet's transitions), a slice of the batch at a time, its
    dropout's mask then kept at one bit a value."""

    def __init__(self, channels: int, spatial_dims: int, drop_rate: float, norm_layer: NormLayer | None,
                 act_layer: ActLayer | None = None) -> None:
        super().__init__()
        self.norm, self.relu = norm_and_act(norm_layer, act_layer, channels, spatial_dims)
        self.conv = _CONV[spatial_dims](channels, channels, 1, bias=False)
        self.drop_rate = drop_rate
        self.spatial_dims = spatial_dims

    def _run(self, *maps: Tensor) -> Tensor:
        x = self.conv(self.relu(normalize_maps(self.norm, *maps)))
        if self.drop_rate > 0:
            x = F.dropout(x, self.drop_rate, self.training)
        return _MAX_POOL[self.spatial_dims](x, 2)

    def forward(self, maps: Sequence[Tensor], segment: bool = False) -> Tensor:
        # Its rerun holds the normalised map, the convolution's output and the pool's input, and their gradients:
        # sliced in frugal mode, as DenseNet's transitions are. Efficient's peak is at the top of the up path, where
        # the dropout masks sliced transitions keep would only add to it.
        slices = self.conv_slices(maps, (1, 1)) if segment else 1  # its convolution keeps the channels
        if slices > 1:
            out = light_segment([(self.norm, self.relu, _DroppedPool(self))], *maps, slices=slices)
            if out is not None:
                return out
        return checkpointed(segment, self._run, *maps, random=self.training and self.drop_rate > 0)


class _DroppedPool(PooledConv):
    """A transition down's convolution, dropout and max-pool, as its norm's post in a sliced segment (made for one
    forward). Forward runs the plain model's dropout on the whole batch, after drawing its mask once more (from the
    same random state, so the plain model's stream is untouched) to keep at one bit a value. Backward rebuilds a
    slice's pool input from its convolution and the mask, recomputes the argmax, and goes back through the pool and
    the dropout by the kernels autograd calls for the plain model; a rerun (double backward) applies the kept mask."""

    def __init__(self, down: TransitionDown) -> None:
        super().__init__(down.conv, self._drop_and_pool)
        self.rate = down.drop_rate if down.training else 0.0
        self.dims = down.spatial_dims

    def _drop_and_pool(self, z: Tensor) -> Tensor:
        if self.rate > 0 and not self.kept:
            state, like = random_state(z.device), (z.shape, z.stride(), z.dtype, z.device)
            # In place only on the CPU, whose dropout draws alike either way; a GPU's fused kernel draws otherwise.
            inplace = z.device.type == "cpu"
            noise = replayed(functools.partial(F.dropout, p=self.rate, training=True, inplace=inplace), state, like)
            self.kept = pack_bits(noise.ne(0)), noise.max()  # noise is 0 or the scale, 1 / (1 - rate)
            del noise
            z = F.dropout(z, self.rate, True)
        elif self.kept:  # a rerun
            z = z * self._noise(z.shape, None)
        return _MAX_POOL[self.dims](z, 2)

    def _noise(self, shape: Sequence[int], part: tuple[int, int] | None) -> Tensor:
        """The dropout's noise (0 or its scale, in the convolution's dtype) of ``shape``, for the samples ``part`` of
        the batch (None: all)."""
        bits, scale = self.kept
        return unpack_bits(bits if part is None else bits[part[0]:part[1]], shape) * scale

    def input_grad(self, ctx: Any, y: Tensor, grad: Tensor, part: tuple[int, int] | None) -> Tensor:
        z = self.conv._conv_forward(as_conv_sees(ctx, y), as_conv_sees(ctx, self.weight), None)  # as forward ran
        noise, dtype = self._noise(z.shape, part) if self.kept else None, z.dtype
        if noise is not None:
            z.mul_(noise)
        # the pool may have run in float32 (CPU autocast's max_pool3d); one spatial dim pools as torch's max_pool1d,
        # a height-one 2D map
        window = [1, 2] if self.dims == 1 else [2] * self.dims
        grad_z = max_pool_input_grad(z.to(grad.dtype), grad, window, window, [0] * len(window)).to(dtype)
        del z
        return grad_z if noise is None else grad_z.mul_(noise)


class TransitionUp(nn.Module):
    """A 3x3 stride-2 transposed convolution (``conv``) of the concatenated maps it is given, centre-cropped to
    ``size`` as the reference implementations crop: it makes ``2n + 1`` positions from ``n``, at least the skip's
    size whether that was even or odd. Outside plain mode the concatenation is rebuilt in backward, not kept."""

    def __init__(self, in_channels: int, out_channels: int, spatial_dims: int) -> None:
        super().__init__()
        self.conv = _CONV_UP[spatial_dims](in_channels, out_channels, 3, stride=2)

    def _run(self, *maps: Tensor) -> Tensor:
        return self.conv(cat_maps(maps))

    def forward(self, maps: Sequence[Tensor], size: Sequence[int], segment: bool = False) -> Tensor:
        x = checkpointed(segment, self._run, *maps)
        # by index, not over ``size``: under torch.fx it is a graph value, which cannot be iterated
        for axis in range(2, 2 + len(self.conv.kernel_size)):  # a view: the crop keeps nothing
            want = size[axis - 2]
            x = x.narrow(axis, (x.shape[axis] - want) // 2, want)
        return x


class FCDenseNet(MemoryMode):
    """FC-DenseNet ("Tiramisu") for segmentation: logits of ``out_channels`` classes at every input position.

    Args:
        spatial_dims: 2 for images (N, C, H, W), 3 for volumes (N, C, D, H, W), 1 for signals (N, C, L).
        in_channels: input channels.
        out_channels: classes (the 1x1 classifier's outputs; no softmax is applied).
        down_blocks: dense layers in each block of the down path; each is followed by a transition down.
        up_blocks: dense layers in each block of the up path, as many as ``down_blocks``.
        bottleneck_layers: dense layers of the block between the paths.
        growth_rate: new feature maps per dense layer (k).
        init_features: channels of the first 3x3 convolution.
        drop_rate: dropout after every dense layer and transition down (the paper's 0.2).
        bn_size: None (the paper's BN-ReLU-conv3x3 layers), or a bottleneck factor (DenseNet-BC layers).
        norm_layer: each norm, as timm's models take it: a name ('batchnorm', 'groupnorm', ...) or what makes one
            for a number of channels (:func:`~effidense.layers.norm.norm_and_act`); default BatchNorm.
        act_layer: the activation after each norm: a timm name ('relu', 'silu', ...), an ``nn.Module`` class or
            what makes one; default in-place ReLU.
        memory: 'plain', 'efficient' (default) or 'frugal' (see the module docstring); settable later.
        backward_slices: 'auto' (a layer's rerun goes through the batch in slices where it would hold more than its
            block keeps, and more than 32 MiB), a number of slices, or None (never); settable later, as DenseNet's.
        device, dtype: where the parameters and buffers are, and their floating-point type, as timm's models take
            them (``device="meta"``: shapes only); the weights are those of the float32 model, cast.

    An input needs at least ``2 ** len(down_blocks)`` positions along every axis (32 for the paper's five
    poolings); any size from there works, even or odd.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int,
                 down_blocks: Sequence[int] = (4, 5, 7, 10, 12), up_blocks: Sequence[int] = (12, 10, 7, 5, 4),
                 bottleneck_layers: int = 15, growth_rate: int = 16, init_features: int = 48,
                 drop_rate: float = 0.2, bn_size: int | None = None, norm_layer: NormLayer | None = None,
                 memory: str = "efficient", backward_slices: int | str | None = "auto",
                 act_layer: ActLayer | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        check_spatial_dims(spatial_dims)
        check_positive(in_channels=in_channels, out_channels=out_channels, init_features=init_features,
                       growth_rate=growth_rate)
        check_counts("down_blocks", down_blocks)
        check_counts("up_blocks", up_blocks)
        check_positive(bottleneck_layers=bottleneck_layers)
        down, up = tuple(down_blocks), tuple(up_blocks)
        if len(down) != len(up):
            raise ValueError(f"up_blocks must have as many blocks as down_blocks ({len(down)}), got {len(up)}: each "
                             "up block takes the skip of one down block")
        self.spatial_dims, self.in_channels, self.out_channels = spatial_dims, in_channels, out_channels
        self.down_blocks, self.up_blocks, self.bottleneck_layers = down, up, bottleneck_layers
        block = functools.partial(DenseBlock, growth_rate=growth_rate, bn_size=bn_size, drop_rate=drop_rate,
                                  spatial_dims=spatial_dims, memory="plain", norm_layer=norm_layer,
                                  act_layer=act_layer)

        self.stem = _CONV[spatial_dims](in_channels, init_features, 3, padding=1)
        self.down = nn.ModuleList()
        self.transitions_down = nn.ModuleList()
        channels, skips = init_features, []
        for n in down:
            self.down.append(block(n, channels))
            channels += n * growth_rate
            skips.append(channels)
            self.transitions_down.append(TransitionDown(channels, spatial_dims, drop_rate, norm_layer, act_layer))
        self.bottleneck = block(bottleneck_layers, channels, new_features_only=True)
        self.transitions_up = nn.ModuleList()
        self.up = nn.ModuleList()
        new = bottleneck_layers * growth_rate  # the new features the previous block hands on
        for i, n in enumerate(up):
            self.transitions_up.append(TransitionUp(new, new, spatial_dims))
            channels = new + skips[-1 - i]
            last = i == len(up) - 1
            self.up.append(block(n, channels, new_features_only=not last))
            new = n * growth_rate
        self.num_features = channels + new  # what the classifier reads: the last block's whole stack
        self.classifier = _CONV[spatial_dims](self.num_features, out_channels, 1)

        for m in self.modules():
            if isinstance(m, (nn.modules.conv._ConvNd)):
                nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")  # the paper's HeUniform
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.memory, self.backward_slices = memory, backward_slices
        if device is not None or dtype is not None:  # initialised as on the CPU in float32: the same weights
            self.to(device=device, dtype=dtype)

    def set_compile(self, enabled: bool = True, **options: Any) -> FCDenseNet:
        """Compile the whole model in place (``nn.Module.compile(**options)``), its segments inside;
        ``set_compile(False)`` returns to eager. Returns the model. Sizes are static unless ``dynamic=`` says
        otherwise, so each new input size compiles anew: with symbolic sizes torch 2.14's inductor fails on this
        model's backward ("Cannot convert expression to float")."""
        self._compiled_call_impl = None  # nn.Module.compile's slot: undo a previous compile
        if enabled:
            self.compile(**{"dynamic": False, **options})
        return self

    def set_memory(self, memory: str) -> FCDenseNet:
        """Switch the memory mode of a built model; returns the model."""
        self.memory = memory
        return self

    @property
    def min_input_size(self) -> int:
        """Smallest size along each axis: every max-pool of the down path must leave at least one position."""
        return 2 ** len(self.down_blocks)

    def check_input(self, x: Tensor) -> None:
        """Refuse, in one line, an input of another shape or one too small for the down path (under ``torch.fx``,
        where shapes are graph values, nothing is checked)."""
        if isinstance(x, torch.fx.Proxy):
            return
        axes = ("L",) if self.spatial_dims == 1 else ("D", "H", "W")[-self.spatial_dims:]
        if x.dim() != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected an input of shape (N, {self.in_channels}, {', '.join(axes)}), got "
                             f"{tuple(x.shape)} (spatial_dims={self.spatial_dims}, in_channels={self.in_channels})")
        sizes = tuple(x.shape[2:])
        if min(sizes) < self.min_input_size:
            raise ValueError(f"input of {'x'.join(map(str, sizes))} does not survive the down path: its "
                             f"{len(self.down_blocks)} max-pools need at least {self.min_input_size} positions along "
                             "every axis")

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        # Segments only where autograd records and nobody traces (checkpointed itself runs them plainly otherwise).
        segment = run_mode(self._memory) != "plain"
        maps, skips = [self.stem(x)], []
        for block, down in zip(self.down, self.transitions_down, strict=True):
            maps = block.run(maps)  # the skip, its maps apart
            skips.append(maps)
            maps = [down(maps, segment)]
        new = self.bottleneck.run(maps)[len(maps):]
        for i, (up, block) in enumerate(zip(self.transitions_up, self.up, strict=True)):
            skip = skips[-1 - i]
            maps = [up(new, skip[0].shape[2:], segment), *skip]
            stack = block.run(maps)
            new = stack[len(maps):]
        return concat_conv(self.classifier, *stack, light=segment)


def concat_conv(conv: nn.Module, *maps: Tensor, light: bool) -> Tensor:
    """``conv`` (a convolution, with a bias or not: a classifier) of the concatenated ``maps``; when ``light``,
    keeping only the maps for backward. Where the maps' gradients are gathered (:class:`GradSlot`), its share is
    added there rather than handed to autograd, unless ``conv`` has hooks: it is then called where autograd records."""
    slots = slots_of(maps) if light and not is_tracing() else ()  # a traced map is a graph value
    if not any(slots) or not torch.is_grad_enabled() or hooked(conv) or \
            not torch_conv(conv) or conv.padding_mode != "zeros" or not isinstance(conv.padding, tuple) or \
            conv.groups != 1 or maps[0].is_meta:  # autocast, whose state backward keeps, knows no meta device
        return checkpointed(light, lambda *t: conv(cat_maps(t)), *maps)
    return _GatheringConv.apply(conv, slots, conv.weight, conv.bias, *maps)


class _GatheringConv(torch.autograd.Function):
    """:func:`concat_conv`: forward runs the convolution (by the weight it was given) and keeps the maps; backward calls
    ``convolution_backward`` under forward's autocast state map by map, on the weight's channels for the map, so
    neither the concatenation nor its gradient is ever made whole: each map's gradient is a tensor of its own, freed
    once the map's maker has taken it."""

    @staticmethod
    def forward(ctx: Any, conv: nn.Module, slots: tuple, weight: Tensor, bias: Tensor | None, *maps: Tensor) -> Tensor:
        ctx.conv, ctx.slots, ctx.autocast = conv, slots, autocast_state(maps[0])
        ctx.save_for_backward(weight, bias, *maps)
        return conv._conv_forward(cat_maps(maps), weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        conv, (weight, bias, *maps) = ctx.conv, ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: gradients by a rerun, handed to autograd
            return differentiable_rerun(ctx, grad, lambda *t: conv._conv_forward(cat_maps(t), weight, bias),
                                        (None, None, weight, bias), tuple(maps))
        needs, grad_maps, grad_ws, grad_b, start = ctx.needs_input_grad, [], [], None, 0
        for i, (t, slot, need) in enumerate(zip(maps, ctx.slots, needs[4:], strict=True)):
            part = as_conv_sees(ctx, weight[:, start:start + t.shape[1]])
            start += t.shape[1]
            with_bias = i == 0 and bias is not None and needs[3]
            grad_x, grad_w, grad_bias = torch.ops.aten.convolution_backward(
                grad, as_conv_sees(ctx, t), part, [bias.shape[0]] if with_bias else None, list(conv.stride),
                list(conv.padding), list(conv.dilation), False, [0] * len(conv.stride), conv.groups,
                [need, needs[2], with_bias])
            grad_ws.append(grad_w)
            grad_b = grad_bias if with_bias else grad_b
            if grad_x is not None and slot is not None:
                slot.add(grad_x.to(t.dtype))
                grad_x = None
            grad_maps.append(grad_x)
        grad_w = torch.cat(grad_ws, 1).to(weight.dtype) if needs[2] else None
        return None, None, grad_w, None if grad_b is None else grad_b.to(bias.dtype), *grad_maps


def _build(name: str, spatial_dims: int, in_channels: int, out_channels: int, **kwargs: Any) -> FCDenseNet:
    return FCDenseNet(spatial_dims, in_channels, out_channels, **{**FCDENSENET_CONFIGS[name], **kwargs})


def fcdensenet56(spatial_dims: int = 2, in_channels: int = 3, out_channels: int = 11, **kwargs: Any) -> FCDenseNet:
    """FC-DenseNet56 (k=12, 4 layers per block): about 1.4M parameters. Default 11 classes (CamVid's)."""
    return _build("fcdensenet56", spatial_dims, in_channels, out_channels, **kwargs)


def fcdensenet67(spatial_dims: int = 2, in_channels: int = 3, out_channels: int = 11, **kwargs: Any) -> FCDenseNet:
    """FC-DenseNet67 (k=16, 5 layers per block): about 3.5M parameters. Default 11 classes (CamVid's)."""
    return _build("fcdensenet67", spatial_dims, in_channels, out_channels, **kwargs)


def fcdensenet103(spatial_dims: int = 2, in_channels: int = 3, out_channels: int = 11, **kwargs: Any) -> FCDenseNet:
    """FC-DenseNet103 (k=16, blocks 4-5-7-10-12, bottleneck 15): about 9.4M parameters. Default 11 classes."""
    return _build("fcdensenet103", spatial_dims, in_channels, out_channels, **kwargs)
