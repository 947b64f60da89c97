"""Which DenseNet a tool works on: a named configuration or a custom one, parsed the same way by every tool.

A :class:`ModelSpec` holds the full keyword arguments of :class:`effidense.DenseNet` (without the memory mode, which
the tools choose per variant) and builds the model in any mode. Its :attr:`ModelSpec.architecture` is the one
answer to "which DenseNet is this": an :class:`Architecture` holds what the weights determine (the converter reads it
off a checkpoint and writes it into a safetensors header), and :meth:`Architecture.spec` turns it back into a spec.
``add_model_arguments`` / ``spec_from_args`` give ``tools/bench.py`` and ``tools/gradcheck.py`` the same
``--model`` and custom-config flags.
"""
from __future__ import annotations

import argparse
import ast
import inspect
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .densenet import DenseNet
from .names import CONFIGS, model_names, unknown_model_message

__all__ = ["Architecture", "ModelSpec", "resolve_model", "model_names", "add_model_arguments", "spec_from_args",
           "ModelKwargs", "OneLineParser", "positive_int", "non_negative_int", "integer_in", "float_list", "seed",
           "thread_count",
           "max_threads", "SEED_RANGE"]

_MODE_ARGS = ("memory", "efficient", "compile")  # chosen per variant by the tools, never part of a spec
_DENSENET_ARGS = [name for name in inspect.signature(DenseNet.__init__).parameters
                  if name != "self" and name not in _MODE_ARGS]
_DEFAULTS = {name: p.default for name, p in inspect.signature(DenseNet.__init__).parameters.items()}


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
        return DenseNet(**{**self.kwargs, **overrides, "memory": memory})

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


def _validate(spec: ModelSpec) -> None:
    # Building the model is the one authority on valid configurations; a meta-device build costs no memory.
    import torch

    with torch.device("meta"):
        spec.build()


def add_model_arguments(parser: argparse.ArgumentParser, default_model: str | None,
                        default_help: str | None = None) -> None:
    """``--model`` plus the custom-config flags, shared by the tools."""
    group = parser.add_argument_group("model", "a named configuration, optionally changed by the flags below")
    shown = default_help or default_model
    group.add_argument("--model", default=default_model,
                       help=f"effi_* timm name, bare config name or 'custom' (default: {shown}); "
                            f"choices: {', '.join(model_names())}")
    group.add_argument("--growth-rate", type=int, help="new feature maps per dense layer (k)")
    group.add_argument("--block-config", type=_int_list, help="layers per dense block, e.g. 6,12,24,16")
    group.add_argument("--num-init-features", type=int, help="channels after the stem")
    group.add_argument("--bn-size", type=_bn_size, help="bottleneck factor (DenseNet-BC), or 'none' for plain DenseNet")
    group.add_argument("--compression", type=float, help="fraction of channels a transition keeps")
    group.add_argument("--drop-rate", type=float, help="dropout on each dense layer's new features")
    group.add_argument("--num-classes", type=int, help="classifier outputs")
    group.add_argument("--small-inputs", action=argparse.BooleanOptionalAction, default=None,
                       help="3x3 stride-1 stem for 32x32 images (--no-small-inputs: ImageNet 7x7/2 stem + max-pool)")
    group.add_argument("--spatial-dims", type=int, choices=(1, 2, 3),
                       help="2: images (default); 3: volumes (--img-size is then the cube's edge); 1: signals")
    group.add_argument("--in-chans", type=int, help="input channels (e.g. 1 for CT or MRI volumes)")
    group.add_argument("--model-kwargs", nargs="*", action=ModelKwargs, default={}, metavar="KEY=VALUE",
                       help="DenseNet constructor arguments as timm takes them (values are Python literals, else "
                            "strings), e.g. growth_rate=12 block_config=\"(4,4)\"; the flags above take precedence")


_FLAG_ARGS = ("growth_rate", "block_config", "num_init_features", "bn_size", "compression", "drop_rate",
              "num_classes", "small_inputs", "spatial_dims", "in_chans")


def spec_from_args(args: argparse.Namespace) -> ModelSpec:
    """The spec the parsed flags of :func:`add_model_arguments` describe."""
    overrides = dict(args.model_kwargs)
    for key in _FLAG_ARGS:
        value = getattr(args, key)
        if value is not None:
            overrides[key] = None if value == "none" else value
    return resolve_model(args.model, overrides)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _bn_size(text: str) -> int | str:
    if text.lower() == "none":
        return "none"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'none', got {text!r}") from None


class ModelKwargs(argparse.Action):
    """timm's ``--model-kwargs KEY=VALUE ...`` (as :class:`timm.utils.ParseKwargs` of timm >= 1.0.30 reads them:
    values are Python literals, else strings, and may hold ``=``; older timm splits at every ``=``), with a one-line
    argparse error naming the option for a pair that is not ``KEY=VALUE``."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: str | Sequence[Any] | None, option_string: str | None = None) -> None:
        values = [value for value in values or [] if value]  # timm skips empty ones too
        for value in values:
            key, eq, text = value.partition("=")
            if not eq or not key.isidentifier():
                raise argparse.ArgumentError(self, f"{value!r} is not KEY=VALUE; give DenseNet arguments as timm "
                                                   "does, e.g. growth_rate=12 block_config='(3,3,3)'")
            if text.lstrip()[:1] in "([{" and text.strip():
                # A bracket means a literal was meant: timm would silently keep a malformed one as a string.
                try:
                    ast.literal_eval(text)
                except (ValueError, SyntaxError):
                    raise argparse.ArgumentError(self, f"{key}: {text!r} is not a valid Python literal") from None
        kwargs: dict[str, Any] = {}
        for value in values:
            key, _, text = value.partition("=")
            try:
                kwargs[key] = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                kwargs[key] = text  # a plain string needs no quotes on the command line
        setattr(namespace, self.dest, kwargs)


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (``prog: error: ...``), without the usage block.

    Under torchrun every rank parses the same command line: only rank 0 (or a process outside torchrun) prints it."""

    def error(self, message: str) -> Any:
        primary = os.environ.get("RANK", "0") == "0"
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n" if primary else None)


def positive_int(text: str) -> int:
    """argparse type for integers >= 1."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type for integers >= 0."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def integer_in(low: int, high: int) -> Callable[[str], int]:
    """An argparse type for integers from ``low`` to ``high``."""
    def parse(text: str) -> int:
        value = _int(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}, got {value}")
        return value

    return parse


# torch.manual_seed's range is [-2**63, 2**64); the tools add small offsets (per step, per rank) to the seed.
SEED_RANGE = (-(2 ** 63), 2 ** 63 - 1)


def seed(text: str) -> int:
    """argparse type for a random seed: an integer torch.manual_seed takes, with room for the tools' offsets."""
    value = _int(text)
    if not SEED_RANGE[0] <= value <= SEED_RANGE[1]:
        raise argparse.ArgumentTypeError(f"must be between {SEED_RANGE[0]} and {SEED_RANGE[1]}, got {value}")
    return value


def max_threads() -> int:
    """The most torch CPU threads a tool accepts: torch crashes (segfault) when it cannot start the threads it was
    told to use, and more threads than cores only contend for them."""
    return max(1024, os.cpu_count() or 1)


def thread_count(text: str) -> int:
    """argparse type for torch CPU threads: 1 to :func:`max_threads`."""
    value = positive_int(text)
    if value > max_threads():
        raise argparse.ArgumentTypeError(f"must be at most {max_threads()} (this machine has {os.cpu_count()} "
                                         f"cores), got {value}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def float_list(text: str) -> Sequence[float]:
    """argparse type for comma-separated positive (finite) numbers."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or not all(0 < v < math.inf for v in values):  # NaN fails both comparisons
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values
