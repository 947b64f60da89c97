"""FC-DenseNet weights: the architecture read off a state dict's keys, checked key by key, and verified in every
memory mode. :mod:`effidense.convert` calls these when a checkpoint is an FC-DenseNet's; reading, the key table and
writing are :mod:`effidense.weights`'s, as for the classifiers.

An FC-DenseNet's keys are :class:`effidense.FCDenseNet`'s module paths (``stem.*``, ``down.{i}.denselayer{j}.*``,
``transitions_down.{i}.*``, ``bottleneck.*``, ``transitions_up.{i}.*``, ``up.{i}.*``, ``classifier.*``); they have one
layout, effidense's (torchvision, timm and MONAI have no FC-DenseNet), so converting is checking, completing (absent
BatchNorm counters) and writing .safetensors or .pth. Every failure raises :class:`ConversionError` in one line.
"""
from __future__ import annotations

import functools
import json
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn

from .densenet import MEMORY_MODES
from .fcdensenet import FCDENSENET_CONFIGS, FCDenseNet
from .fileio import short_error
from .harness.tiramisu import ReferenceTiramisu
from .weights import ConversionError, canonical_key, complete_state_dict, describe_misfit, is_bn_counter, listing

__all__ = ["FCDenseNetArchitecture", "is_fcdensenet_state_dict", "infer_fcdensenet_architecture",
           "fcdensenet_architecture", "check_fcdensenet_state_dict", "convert_fcdensenet_state_dict",
           "verify_fcdensenet"]

# The first part of every FC-DenseNet key; a DenseNet's start with 'features.' (or are its 'classifier.*').
_PARTS = ("stem.", "down.", "transitions_down.", "bottleneck.", "transitions_up.", "up.")
_BLOCK_LAYER = re.compile(r"^(down|up)\.(\d+)\.denselayer(\d+)\.")
_BOTTLENECK_LAYER = re.compile(r"^bottleneck\.denselayer(\d+)\.")
_CONV = re.compile(r"^(?:down\.\d+|up\.\d+|bottleneck)\.denselayer\d+\.(conv1|conv2)\.weight$")


@dataclass(frozen=True)
class FCDenseNetArchitecture:
    """Which FC-DenseNet this is: :class:`effidense.FCDenseNet`'s arguments that its weights determine (BatchNorm
    layers; dropout leaves no trace)."""

    spatial_dims: int
    in_channels: int
    out_channels: int
    down_blocks: tuple[int, ...]
    up_blocks: tuple[int, ...]
    bottleneck_layers: int
    growth_rate: int
    init_features: int
    bn_size: int | None = None

    network = "FCDenseNet"  # what the safetensors header says the architecture entry describes

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :class:`effidense.FCDenseNet`."""
        return asdict(self)

    def build(self, memory: str = "plain", **kwargs: Any) -> FCDenseNet:
        return FCDenseNet(**self.model_kwargs(), **kwargs, memory=memory)

    def to_json(self) -> str:
        return json.dumps(self.model_kwargs(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> FCDenseNetArchitecture:
        values = json.loads(text)
        return cls(**{f.name: tuple(values[f.name]) if isinstance(values.get(f.name), list) else values.get(f.name)
                      for f in fields(cls)})

    def describe(self) -> str:
        return ", ".join(f"{k}={'none' if v is None else v}" for k, v in self.model_kwargs().items())


def is_fcdensenet_state_dict(state_dict: Mapping[str, Any]) -> bool:
    """Whether the keys (any prefix of :data:`effidense.weights.KEY_RULES` allowed) are an FC-DenseNet's rather than a
    DenseNet's."""
    keys = [canonical_key(k) for k in state_dict]
    return any(k.startswith(_PARTS) for k in keys) and not any(k.startswith("features.") for k in keys)


def _sizes(state_dict: Mapping[str, Tensor], key: str, axis: int = 0) -> list[int]:
    value = state_dict.get(key)
    return [value.shape[axis]] if isinstance(value, Tensor) and value.dim() > axis else []


def _majority(values: list[int], what: str) -> int:
    """The value most keys tell (one corrupt tensor is then blamed by name, not believed)."""
    if not values:
        raise ConversionError(f"not an FC-DenseNet checkpoint: no key tells its {what}")
    return Counter(values).most_common(1)[0][0]


def _blocks(counts: dict[int, int], path: str) -> tuple[int, ...]:
    if not counts:
        raise ConversionError(f"not an FC-DenseNet checkpoint: no '{path}.N.denselayerM.*' keys")
    config = tuple(counts.get(i, 0) for i in range(max(counts) + 1))
    if 0 in config:
        raise ConversionError(f"{path}.{config.index(0)} has no dense layers in this checkpoint")
    return config


def infer_fcdensenet_architecture(state_dict: Mapping[str, Tensor]) -> FCDenseNetArchitecture:
    """Read the architecture off FC-DenseNet weights (canonical keys): the blocks' layer counts from the key names,
    spatial dims and input channels from the first convolution, the growth rate (and DenseNet-BC bottleneck) from
    every dense layer's convolutions, classes from the classifier."""
    stem = state_dict.get("stem.weight")
    if not isinstance(stem, Tensor) or stem.dim() not in (3, 4, 5):
        raise ConversionError(f"not an FC-DenseNet checkpoint: no 3-, 4- or 5-d 'stem.weight' (keys: "
                              f"{listing(state_dict)})")
    down: dict[int, int] = {}
    up: dict[int, int] = {}
    bottleneck = 0
    for key in state_dict:
        if m := _BLOCK_LAYER.match(key):
            counts = down if m[1] == "down" else up
            counts[int(m[2])] = max(counts.get(int(m[2]), 0), int(m[3]))
        elif m := _BOTTLENECK_LAYER.match(key):
            bottleneck = max(bottleneck, int(m[1]))
    if not bottleneck:
        raise ConversionError("not an FC-DenseNet checkpoint: no 'bottleneck.denselayerM.*' keys")
    if not any(k.endswith(".running_var") for k in state_dict):
        raise ConversionError("these FC-DenseNet weights have no BatchNorm running statistics (a GroupNorm or "
                              "InstanceNorm model?): only BatchNorm models convert, since other norms' settings "
                              "leave no trace in the weights")
    convs: dict[str, list[Tensor]] = {"conv1": [], "conv2": []}
    for key, value in state_dict.items():
        if (m := _CONV.match(key)) and value.dim() == stem.dim():
            convs[m[1]].append(value)
    if convs["conv2"]:  # DenseNet-BC layers: conv2 makes the new features, conv1 the bottleneck's bn_size * k
        growth = _majority([w.shape[0] for w in convs["conv2"]], "growth rate")
        bn_size = _majority([w.shape[0] // growth for w in convs["conv1"] if w.shape[0] % growth == 0],
                            "bottleneck width")
    else:
        growth, bn_size = _majority([w.shape[0] for w in convs["conv1"]], "growth rate"), None
    init = _majority([stem.shape[0], *_sizes(state_dict, "stem.bias"),
                      *_sizes(state_dict, "down.0.denselayer1.norm1.weight")], "first convolution's width")
    classes = _majority([*_sizes(state_dict, "classifier.weight"), *_sizes(state_dict, "classifier.bias")],
                        "classes ('classifier.weight')")
    arch = FCDenseNetArchitecture(stem.dim() - 2, stem.shape[1], classes, _blocks(down, "down"), _blocks(up, "up"),
                                  bottleneck, growth, init, bn_size)
    _expected_shapes(arch)  # refuses, in one line, numbers that make no FC-DenseNet
    return arch


def fcdensenet_architecture(name: str, state_dict: Mapping[str, Tensor]) -> FCDenseNetArchitecture:
    """The named network (``fcdensenet56``, ``67`` or ``103``) with the spatial dims, input channels and classes of
    ``state_dict``'s first convolution and classifier."""
    if name not in FCDENSENET_CONFIGS:
        raise ConversionError(f"the weights are an FC-DenseNet's, not a {name}'s; name one of "
                              f"{', '.join(FCDENSENET_CONFIGS)}, or none to read the architecture off the weights")
    stem = state_dict.get("stem.weight")
    dims, channels = (stem.dim() - 2, stem.shape[1]) if isinstance(stem, Tensor) and stem.dim() in (3, 4, 5) else (2, 3)
    classes = (_sizes(state_dict, "classifier.weight") or [11])[0]
    config = FCDENSENET_CONFIGS[name]
    return FCDenseNetArchitecture(dims, channels, classes, tuple(config["down_blocks"]), tuple(config["up_blocks"]),
                                  config["bottleneck_layers"], config["growth_rate"], 48)


@functools.lru_cache(maxsize=16)
def _expected_shapes(arch: FCDenseNetArchitecture) -> dict[str, tuple[int, ...]]:
    try:
        with torch.device("meta"):  # shapes only: no memory, no initialisation cost
            model = arch.build()
    except ValueError as e:
        raise ConversionError(f"the weights describe no valid FC-DenseNet: {e}") from None
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def check_fcdensenet_state_dict(state_dict: Mapping[str, Tensor], arch: FCDenseNetArchitecture,
                                what: str = "") -> None:
    """Raise :class:`ConversionError` naming every unknown, missing (but BatchNorm counters) and mis-shaped key of
    canonical ``state_dict`` for ``arch``."""
    expected = _expected_shapes(arch)
    unknown = [k for k in state_dict if k not in expected]
    missing = [k for k in expected if k not in state_dict and not is_bn_counter(k)]
    mismatched = [(k, tuple(v.shape), expected[k]) for k, v in state_dict.items()
                  if k in expected and tuple(v.shape) != expected[k]]
    if unknown or missing or mismatched:
        raise ConversionError(f"the weights do not fit {what or f'FCDenseNet({arch.describe()})'}: "
                              + describe_misfit(unknown, missing, mismatched),
                              unknown=unknown, missing=missing, mismatched=mismatched)


def _named(arch: FCDenseNetArchitecture) -> str | None:
    for name in FCDENSENET_CONFIGS:
        if fcdensenet_architecture(name, {}).model_kwargs() | {
                k: getattr(arch, k) for k in ("spatial_dims", "in_channels", "out_channels")} == arch.model_kwargs():
            return name
    return None


def convert_fcdensenet_state_dict(state_dict: Mapping[str, Tensor], source: str = "effidense",
                                  target: str = "effidense", model: str | None = None, adapt: bool = False,
                                  ) -> tuple[dict[str, Tensor], FCDenseNetArchitecture, str | None, list[str]]:
    """Check canonical FC-DenseNet weights (against ``model``, a name of :data:`FCDENSENET_CONFIGS`, or the
    architecture they describe) and complete them: ``(state dict, architecture, name, notes)``. ``source`` and
    ``target`` are resolved layout names (``auto`` allowed for the source); ``adapt`` says inflation or adaptation
    was asked for, which FC-DenseNet weights do not take."""
    for role, layout in (("source", source), ("target", target)):
        if layout not in ("auto", "effidense"):
            raise ConversionError(f"{role} layout {layout} has no FC-DenseNet: FC-DenseNet weights have one layout, "
                                  "effidense's")
    if adapt:
        raise ConversionError("inflating, adapting the input channels and a fresh classifier apply to DenseNet "
                              "weights; FC-DenseNet weights convert as they are")
    if model is not None:
        arch = fcdensenet_architecture(model.removeprefix("effi_"), state_dict)
        check_fcdensenet_state_dict(state_dict, arch, what=model)
    else:
        arch = infer_fcdensenet_architecture(state_dict)
        check_fcdensenet_state_dict(state_dict, arch)
    out, filled = complete_state_dict(state_dict, _expected_shapes(arch))
    notes = ["FC-DenseNet weights (effidense's layout, the only one)"]
    return out, arch, (model or _named(arch)), notes + filled


def _forward(model: nn.Module, x: Tensor) -> Tensor:
    # autograd records, so the memory modes run their segments as in training; eval mode, so the running
    # statistics the file holds take part
    with torch.enable_grad():
        return model.float().eval()(x).detach()


def verify_fcdensenet(source_state_dict: Mapping[str, Tensor], target_state_dict: Mapping[str, Tensor],
                      arch: FCDenseNetArchitecture, batch_size: int = 2, seed: int = 0) -> dict[str, float]:
    """Each model's largest output difference from the plain FCDenseNet with the source weights: the plain,
    efficient and frugal FCDenseNets with the target weights, and the reference port
    (:class:`effidense.harness.tiramisu.ReferenceTiramisu`, every concatenation a new tensor) with the source weights
    where it can hold them. One random batch in eval mode, one position more than the smallest input along each axis
    (odd: the up path crops)."""
    def loaded(model: nn.Module, state_dict: Mapping[str, Tensor]) -> nn.Module:
        state_dict, _ = complete_state_dict(state_dict, _expected_shapes(arch))
        try:
            model.load_state_dict(state_dict, strict=True)
        except RuntimeError as e:
            raise ConversionError(f"{type(model).__name__} refused the weights: {short_error(e)}") from None
        return model

    reference = loaded(arch.build("plain"), source_state_dict)
    generator = torch.Generator().manual_seed(seed)
    size = reference.min_input_size + 1
    x = torch.randn(batch_size, arch.in_channels, *(size,) * arch.spatial_dims, generator=generator)
    x.requires_grad_(True)
    expected = _forward(reference, x)
    others = {f"{mode} FCDenseNet": lambda mode=mode: loaded(arch.build(mode), target_state_dict)
              for mode in MEMORY_MODES}
    if arch.bn_size is None:  # the port knows the paper's layers only
        kwargs = {k: v for k, v in arch.model_kwargs().items() if k != "bn_size"}
        others["reference port"] = lambda: loaded(ReferenceTiramisu(**kwargs), source_state_dict)
    return {name: (_forward(build(), x) - expected).abs().max().item() for name, build in others.items()}
