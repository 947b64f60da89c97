"""An FC-DenseNet as the tools take one: :class:`SegmentationSpec` answers what they ask of a
:class:`~effidense.modelspec.ModelSpec` (``name``, ``arg``, ``build``, ``size_problem``, ``describe``, ``depth``,
``default_img_size``), so gradcheck's checks, batches and training step, and bench's, run on
:class:`effidense.FCDenseNet` unchanged. Its logits have a class per position; the harness's step gives each
sample's label to all of its positions.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..fcdensenet import FCDENSENET_CONFIGS, FCDenseNet
from ..modelspec import MAX_TENSOR_BYTES

__all__ = ["SegmentationSpec", "segmentation_spec"]

_DEFAULTS = {name: p.default for name, p in inspect.signature(FCDenseNet.__init__).parameters.items()
             if p.default is not inspect.Parameter.empty}
# An RGB image of CamVid's 11 classes; no dropout unless asked for, as a DenseNet spec: the checks that compare
# processes or runs draw no masks, and those about dropout set it themselves.
_DEFAULTS.update(spatial_dims=2, in_channels=3, out_channels=11, drop_rate=0.0)
# The DenseNet names the tools ask a spec for, and FCDenseNet's for the same thing.
_ALIASES = {"in_chans": "in_channels", "num_classes": "out_channels", "num_init_features": "init_features"}


@dataclass(frozen=True)
class SegmentationSpec:
    """An FC-DenseNet configuration: ``name`` for humans, ``kwargs`` for :class:`FCDenseNet` (no memory mode)."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def arg(self, key: str) -> Any:
        """An FCDenseNet argument (or the DenseNet name of one: ``in_chans``, ``num_classes``), its default where the
        spec does not set it."""
        key = _ALIASES.get(key, key)
        return self.kwargs.get(key, _DEFAULTS.get(key))

    def build(self, memory: str = "plain", **overrides: Any) -> FCDenseNet:
        """A fresh model in memory mode ``memory``; ``overrides`` replace spec arguments (e.g. ``drop_rate``)."""
        kwargs = {**_DEFAULTS, **self.kwargs, **overrides}
        kwargs.pop("memory", None)
        return FCDenseNet(**kwargs, memory=memory)

    @property
    def depth(self) -> int:
        """Layer count as the paper counts it (103 for FC-DenseNet-103): the first convolution, the dense layers'
        convolutions, one per transition down and up, and the classifier."""
        per_layer = 2 if self.arg("bn_size") else 1
        layers = sum(self.arg("down_blocks")) + self.arg("bottleneck_layers") + sum(self.arg("up_blocks"))
        return 2 + per_layer * layers + 2 * len(self.arg("down_blocks"))

    @property
    def default_img_size(self) -> int:
        """The input edge when none is given: the paper's 224x224 training crops."""
        return 224

    @property
    def widest_channels(self) -> int:
        """The most channels any map of the network has: some convolution reads or makes it."""
        with torch.device("meta"):
            model = self.build()
        return max(max(m.in_channels, m.out_channels) for m in model.modules()
                   if isinstance(m, nn.modules.conv._ConvNd))

    def size_problem(self, batch: int, size: tuple[int, ...]) -> str | None:
        """Why a batch of ``batch`` inputs of spatial ``size`` is too large for torch's 64-bit sizes, or None (as
        :meth:`effidense.modelspec.ModelSpec.size_problem`)."""
        values = batch * self.widest_channels * math.prod(size)
        if values * 8 <= MAX_TENSOR_BYTES:
            return None
        return (f"batch {batch} of {'x'.join(map(str, size))} inputs is too large: the step's maps could hold up to "
                f"{values:.3g} values ({self.widest_channels} channels), more than torch's 64-bit sizes are sure to "
                f"hold")

    def describe(self) -> str:
        blocks = f"{self.arg('down_blocks')} - {self.arg('bottleneck_layers')} - {self.arg('up_blocks')}"
        shown = {k: v for k, v in self.kwargs.items() if k not in ("down_blocks", "bottleneck_layers", "up_blocks")}
        extra = ", ".join(f"{k}={v}" for k, v in sorted(shown.items()))
        return f"{self.name} (FC-DenseNet, blocks {blocks}{', ' + extra if extra else ''})"


def segmentation_spec(name: str, overrides: dict[str, Any] | None = None) -> SegmentationSpec:
    """The spec of FC-DenseNet ``name`` (``fcdensenet56``, ``67`` or ``103``) with ``overrides`` (FCDenseNet's
    arguments) applied; a configuration FCDenseNet refuses raises its one-line ValueError before any work."""
    if name not in FCDENSENET_CONFIGS:
        raise ValueError(f"unknown FC-DenseNet {name!r}; choose one of {', '.join(FCDENSENET_CONFIGS)}")
    overrides = dict(overrides or {})
    if "memory" in overrides:
        raise ValueError("memory cannot be set in a model config: the tools choose it per variant")
    known = set(_DEFAULTS) - {"memory"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown FCDenseNet argument(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
    for key in ("down_blocks", "up_blocks"):
        if isinstance(overrides.get(key), list):
            overrides[key] = tuple(overrides[key])
    base = {k: v for k, v in _DEFAULTS.items() if k in ("spatial_dims", "in_channels", "out_channels")}
    spec = SegmentationSpec(name if not overrides else f"{name} (modified)",
                            {**base, **FCDENSENET_CONFIGS[name], **overrides})
    with torch.device("meta"):  # FCDenseNet's constructor is the one authority on valid configurations
        spec.build()
    return spec
