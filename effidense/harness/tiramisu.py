"""A straightforward FC-DenseNet, written as the common PyTorch ports write it: the yardstick for
:class:`effidense.fcdensenet.FCDenseNet`'s memory (the planner's ``reference`` variant, the tests' comparisons).

Every dense layer concatenates its input and its new features with ``torch.cat`` into a new tensor, each block
concatenates again for its output, every skip is a concatenation kept until the up path uses it, and nothing is
recomputed: what autograd keeps is what ports such as bfortuner/pytorch_tiramisu keep. Module names are
FCDenseNet's, so ``reference.load_state_dict(fcdensenet.state_dict())`` gives the same function.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..densenet import MEMORY_MODES
from ..fcdensenet import FCDENSENET_CONFIGS, FCDenseNet

__all__ = ["ReferenceTiramisu", "SEGMENTATION_MODELS", "segmentation_variants"]

SEGMENTATION_MODELS = tuple(FCDENSENET_CONFIGS)

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_UP = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


class _Layer(nn.Module):
    def __init__(self, channels: int, growth_rate: int, drop_rate: float, dims: int) -> None:
        super().__init__()
        self.norm1 = _NORM[dims](channels)
        self.conv1 = _CONV[dims](channels, growth_rate, 3, padding=1, bias=False)
        self.drop_rate = drop_rate

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout(self.conv1(F.relu(self.norm1(x))), self.drop_rate, self.training)


class _Block(nn.ModuleDict):
    def __init__(self, layers: int, channels: int, growth_rate: int, drop_rate: float, dims: int,
                 new_features_only: bool = False) -> None:
        super().__init__({f"denselayer{i + 1}": _Layer(channels + i * growth_rate, growth_rate, drop_rate, dims)
                          for i in range(layers)})
        self.new_features_only = new_features_only

    def forward(self, x: Tensor) -> Tensor:
        new = []
        for layer in self.values():
            out = layer(x)
            x = torch.cat([x, out], 1)
            new.append(out)
        return torch.cat(new, 1) if self.new_features_only else x


class _Down(nn.Module):
    def __init__(self, channels: int, drop_rate: float, dims: int) -> None:
        super().__init__()
        self.norm = _NORM[dims](channels)
        self.conv = _CONV[dims](channels, channels, 1, bias=False)
        self.drop_rate, self.dims = drop_rate, dims

    def forward(self, x: Tensor) -> Tensor:
        x = F.dropout(self.conv(F.relu(self.norm(x))), self.drop_rate, self.training)
        return _MAX_POOL[self.dims](x, 2)


class _Up(nn.Module):
    def __init__(self, channels: int, dims: int) -> None:
        super().__init__()
        self.conv = _CONV_UP[dims](channels, channels, 3, stride=2)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        x = self.conv(x)
        for axis in range(2, x.dim()):  # centre crop to the skip
            x = x.narrow(axis, (x.shape[axis] - skip.shape[axis]) // 2, skip.shape[axis])
        return torch.cat([x, skip], 1)


class ReferenceTiramisu(nn.Module):
    """FC-DenseNet as the ports write it; arguments as :class:`~effidense.fcdensenet.FCDenseNet`'s (BatchNorm,
    no bottleneck)."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int,
                 down_blocks: Sequence[int] = (4, 5, 7, 10, 12), up_blocks: Sequence[int] = (12, 10, 7, 5, 4),
                 bottleneck_layers: int = 15, growth_rate: int = 16, init_features: int = 48,
                 drop_rate: float = 0.2) -> None:
        super().__init__()
        dims, k = spatial_dims, growth_rate
        self.stem = _CONV[dims](in_channels, init_features, 3, padding=1)
        self.down, self.transitions_down = nn.ModuleList(), nn.ModuleList()
        channels, skips = init_features, []
        for n in down_blocks:
            self.down.append(_Block(n, channels, k, drop_rate, dims))
            channels += n * k
            skips.append(channels)
            self.transitions_down.append(_Down(channels, drop_rate, dims))
        self.bottleneck = _Block(bottleneck_layers, channels, k, drop_rate, dims, new_features_only=True)
        self.transitions_up, self.up = nn.ModuleList(), nn.ModuleList()
        new = bottleneck_layers * k
        for i, n in enumerate(up_blocks):
            self.transitions_up.append(_Up(new, dims))
            channels = new + skips[-1 - i]
            self.up.append(_Block(n, channels, k, drop_rate, dims, new_features_only=i < len(up_blocks) - 1))
            new = n * k
        self.classifier = _CONV[dims](channels + new, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        skips = []
        for block, down in zip(self.down, self.transitions_down, strict=True):
            x = block(x)
            skips.append(x)
            x = down(x)
        x = self.bottleneck(x)
        for i, (up, block) in enumerate(zip(self.transitions_up, self.up, strict=True)):
            x = block(up(x, skips[-1 - i]))
        return self.classifier(x)


def segmentation_variants(name: str, spatial_dims: int, in_channels: int, out_channels: int,
                          **kwargs: Any) -> tuple[dict[str, Callable[[], nn.Module]], int]:
    """What the planner compares for FC-DenseNet ``name`` (``fcdensenet103``): a builder for each memory mode and
    for the ``reference`` port, with ``kwargs`` for FCDenseNet; and the smallest input edge the model takes."""
    if name not in FCDENSENET_CONFIGS:
        raise ValueError(f"unknown FC-DenseNet {name!r}; choose one of {', '.join(FCDENSENET_CONFIGS)}")
    config = {**FCDENSENET_CONFIGS[name], **kwargs}
    model = functools.partial(FCDenseNet, spatial_dims, in_channels, out_channels, **config)
    with torch.device("meta"):  # checks the arguments at no cost, and gives the smallest input
        min_size = model().min_input_size
    builders: dict[str, Callable[[], nn.Module]] = {mode: functools.partial(model, memory=mode)
                                                     for mode in MEMORY_MODES}
    unsupported = sorted(set(config) - {"down_blocks", "up_blocks", "bottleneck_layers", "growth_rate",
                                        "init_features", "drop_rate"})
    if not unsupported:  # the port knows BatchNorm layers without bottleneck only
        builders["reference"] = functools.partial(ReferenceTiramisu, spatial_dims, in_channels, out_channels,
                                                  **config)
    return builders, min_size
