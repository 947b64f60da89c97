"""Which DenseNet a tool works on: a named configuration or a custom one, parsed the same way by every tool.

A :class:`ModelSpec` holds the full keyword arguments of :class:`effidense.DenseNet` (without the memory mode, which
the tools choose per variant) and builds the model in any mode. Its :attr:`ModelSpec.architecture` is the one
answer to "which DenseNet is this": an :class:`Architecture` holds what the weights determine (the converter reads it
off a checkpoint and writes it into a safetensors header), and :meth:`Architecture.spec` turns it back into a spec.
The commands' ``--model`` and custom-config flags that describe one are :mod:`effidense.cli.flags`.
"""
from __future__ import annotations

import inspect
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .configs import CONFIGS, unknown_model_message
from .densenet import DenseNet
from .dilation import dilate

__all__ = ["Architecture", "ModelSpec", "dims_of_size", "resolve_model"]

_MODE_ARGS = ("memory", "efficient", "compile")  # chosen per variant by the tools, never part of a spec
# DenseNet's arguments, and DeepLab's output_stride, which dilates the built model (effidense.dilation), as timm's
_DENSENET_ARGS = [name for name in inspect.signature(DenseNet.__init__).parameters
                  if name != "self" and name not in _MODE_ARGS] + ["output_stride"]
_DEFAULTS = {name: p.default for name, p in inspect.signature(DenseNet.__init__).parameters.items()} | \
    {"output_stride": None}


MAX_TENSOR_BYTES = 2 ** 63 - 1  # torch counts a tensor's elements and bytes in int64


@dataclass(frozen=True)
class Architecture:
    """Which DenseNet this is: everything its weights determine (dropout rates and pooling leave no trace).

    The defaults are :class:`DenseNet`'s; :meth:`from_kwargs` reads one out of any DenseNet keyword arguments,
    :meth:`spec` makes a :class:`ModelSpec` of it."""

    growth_rate: int
    block_config: tuple[int, ...]
    num_init_features: int
    bn_size: int | None = _DEFAULTS["bn_size"]
    compression: float = _DEFAULTS["compression"]
    small_inputs: bool = _DEFAULTS["small_inputs"]
    num_classes: int = _DEFAULTS["num_classes"]
    in_chans: int = _DEFAULTS["in_chans"]
    spatial_dims: int = _DEFAULTS["spatial_dims"]

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any], **changes: Any) -> Architecture:
        """The architecture of ``DenseNet(**kwargs)`` (other arguments ignored), with ``changes`` applied."""
        values = {f.name: kwargs.get(f.name, _DEFAULTS[f.name]) for f in fields(cls)}
        values.update(changes)
        return cls(**{**values, "block_config": tuple(values["block_config"])})

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :class:`effidense.DenseNet`."""
        return asdict(self)

    def spec(self, name: str = "custom") -> ModelSpec:
        """A :class:`ModelSpec` of this architecture (no dropout, average pooling)."""
        return ModelSpec(name, self.model_kwargs())

    def to_json(self) -> str:
        return json.dumps(self.model_kwargs(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Architecture:
        """The inverse of :meth:`to_json` (e.g. for the ``effidense.architecture`` safetensors header entry; one
        written before ``spatial_dims`` was recorded describes a 2D network)."""
        return cls.from_kwargs(json.loads(text))

    def describe(self) -> str:
        bn = "none" if self.bn_size is None else self.bn_size
        stem = ", small_inputs" if self.small_inputs else ""
        dims = f", spatial_dims={self.spatial_dims}" if self.spatial_dims != 2 else ""
        return (f"growth_rate={self.growth_rate}, block_config={self.block_config}, "
                f"num_init_features={self.num_init_features}, bn_size={bn}, compression={self.compression:g}"
                f"{stem}, num_classes={self.num_classes}, in_chans={self.in_chans}{dims}")


@dataclass(frozen=True)
class ModelSpec:
    """A DenseNet configuration: ``name`` for humans, ``kwargs`` for :class:`DenseNet` (no memory mode)."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def arg(self, key: str) -> Any:
        """The value of a DenseNet argument, the constructor's default where the spec does not set it."""
        if key in self.kwargs:
            return self.kwargs[key]
        return _DEFAULTS[key]

    @property
    def architecture(self) -> Architecture:
        """Which DenseNet this is, as far as its weights tell (see :class:`Architecture`)."""
        return Architecture.from_kwargs(self.kwargs)

    @property
    def block_config(self) -> tuple[int, ...]:
        return tuple(self.arg("block_config"))

    @property
    def bottleneck(self) -> bool:
        return bool(self.arg("bn_size"))

    @property
    def depth(self) -> int:
        """Layer count as the papers count it: stem conv, dense-layer convs, transition convs, classifier."""
        per_layer = 2 if self.bottleneck else 1
        return 1 + per_layer * sum(self.block_config) + len(self.block_config) - 1 + 1

    @property
    def widest_channels(self) -> int:
        """The most channels any map of the network has: the input's, the stem's, a bottleneck's, a block's output."""
        channels, k, bn_size = self.arg("num_init_features"), self.arg("growth_rate"), self.arg("bn_size")
        widest = max(self.arg("in_chans"), channels, (bn_size or 0) * k)
        for i, n in enumerate(self.block_config):
            channels += n * k
            widest = max(widest, channels)
            if i < len(self.block_config) - 1:
                channels = int(channels * self.arg("compression"))
        return widest

    def size_problem(self, batch: int, size: Sequence[int]) -> str | None:
        """Why a batch of ``batch`` inputs of spatial ``size`` is too large for torch's 64-bit sizes, or None.

        No map of a step is larger than batch x :attr:`widest_channels` x the input's spatial size; past 2**63 - 1
        bytes torch cannot describe a tensor, and fails with messages about its internals."""
        values = batch * self.widest_channels * math.prod(size)
        if values * 8 <= MAX_TENSOR_BYTES:  # 8: float64, the widest dtype the tools use
            return None
        return (f"batch {batch} of {'x'.join(map(str, size))} inputs is too large: the step's maps could hold up to "
                f"{values:.3g} values ({self.widest_channels} channels), more than torch's 64-bit sizes are sure to "
                f"hold")

    @property
    def default_img_size(self) -> int:
        return 32 if self.arg("small_inputs") else 224

    def build(self, memory: str = "plain", **overrides: Any) -> DenseNet:
        """A fresh model in memory mode ``memory``; ``overrides`` replace spec arguments (e.g. ``drop_rate``)."""
        kwargs = {**self.kwargs, **overrides, "memory": memory}
        output_stride = kwargs.pop("output_stride", None)
        model = DenseNet(**kwargs)
        return model if output_stride is None else dilate(model, output_stride)

    def scaled(self, factor: float) -> ModelSpec:
        """The same family with every block's layer count scaled by ``factor`` (at least one layer per block)."""
        blocks = tuple(max(1, round(n * factor)) for n in self.block_config)
        return ModelSpec(f"{self.name} x{factor:g}", {**self.kwargs, "block_config": blocks})

    def describe(self) -> str:
        shown = {k: v for k, v in self.kwargs.items() if k != "block_config"}
        extra = ", ".join(f"{k}={v}" for k, v in sorted(shown.items()))
        return f"{self.name} (depth {self.depth}, blocks {self.block_config}{', ' + extra if extra else ''})"


def resolve_model(name: str | None = None, overrides: dict[str, Any] | None = None) -> ModelSpec:
    """The spec for ``name`` (``effi_densenet121``, ``densenet121`` or ``custom``) with ``overrides`` applied.

    Raises ValueError for an unknown name, an unknown DenseNet argument or a memory-mode argument, and for a
    configuration the DenseNet constructor rejects (so the error names the bad argument before any work starts).
    """
    overrides = dict(overrides or {})
    name = name or "custom"
    config = name[len("effi_"):] if name.startswith("effi_") else name
    if config == "custom":
        base: dict[str, Any] = {}
    elif config in CONFIGS:
        base = dict(CONFIGS[config])
    else:
        raise ValueError(unknown_model_message(name))
    modes = sorted(set(overrides) & set(_MODE_ARGS))
    if modes:
        raise ValueError(f"{', '.join(modes)} cannot be set in a model config: the tools choose it per variant")
    unknown = sorted(set(overrides) - set(_DENSENET_ARGS))
    if unknown:
        raise ValueError(f"unknown DenseNet argument(s) {', '.join(unknown)}; valid: {', '.join(_DENSENET_ARGS)}")
    if "block_config" in overrides:
        overrides["block_config"] = tuple(overrides["block_config"])
    label = name if not overrides or config == "custom" else f"{name} (modified)"
    spec = ModelSpec(label, {**base, **overrides})
    _validate(spec)
    return spec


def dims_of_size(size: Sequence[int], dims: int, chosen: bool, named: str) -> int:
    """The spatial dims that an input of ``size`` (its own sizes, several numbers) gives a model of ``dims``: as many
    as the sizes, which make a named model 2D or 3D, unless its dims were ``chosen``, when the two must agree.
    ``named`` is how the size reads in the message (``"--img-size 16 16"``)."""
    if len(size) != dims and chosen:
        want = "one number" if dims == 1 else f"one number (the edge) or {dims}"
        raise ValueError(f"{named} is a {len(size)}D input but the model is {dims}D (spatial_dims={dims}): give {want}")
    return len(size)


def _validate(spec: ModelSpec) -> None:
    # Building the model is the one authority on valid configurations; a meta-device build costs no memory.
    import torch

    with torch.device("meta"):
        spec.build()
