"""MONAI's DenseNet, memory-efficient: change only the import.

    from monai.networks.nets import DenseNet121   # before
    from effidense.monai import DenseNet121       # after

:class:`DenseNet`, :class:`DenseNet121`, :class:`DenseNet169`, :class:`DenseNet201` and :class:`DenseNet264` (and
MONAI's aliases ``Densenet121``, ``densenet121``, ...) take MONAI 1.6's arguments (``spatial_dims, in_channels,
out_channels, init_features, growth_rate, block_config, bn_size, act, norm, dropout_prob``; the numbered ones also
``pretrained`` and ``progress``) plus ``memory=`` ('plain', 'efficient' (default) or 'frugal', as
:class:`effidense.DenseNet`'s), and compute MONAI's function: stem, dense blocks, transitions, ``norm5``, then
``class_layers`` (the activation, adaptive average pooling, flatten, ``out``: a Linear).

What is MONAI's, so code written for MONAI's model keeps working:

* **State-dict keys** (``features.denseblock1.denselayer1.layers.norm1.weight``, ``class_layers.out.weight``):
  MONAI checkpoints load with ``strict=True``, and ours into MONAI's; weights that do not fit raise one line naming
  the keys (:class:`WeightsMismatchError`).
* **Initial weights**: seeded alike, a model starts from MONAI's very weights (the same random draws, in its order).
* **Parameter order** (``parameters()``), so an optimizer's state dict carries over between the two.
* **Modules** ``class_layers.relu`` / ``.pool`` / ``.flatten`` / ``.out`` (e.g. for ``monai.visualize.CAM``'s
  ``target_layers="class_layers.relu"``). ``norm``: 'batch' (exact running statistics in every memory mode),
  'syncbatch' (the same, synchronised under torch.distributed as ``nn.SyncBatchNorm``),
  'instance' and 'group' (no running statistics; 'instance_nvfuser' is 'instance', as MONAI without apex), with
  MONAI's arguments, e.g. ``("group", {"num_groups": 4})``.
  ``act``: every parameter-free activation MONAI names (relu, leakyrelu, elu, celu, selu, relu6, gelu, sigmoid,
  tanh, swish, memswish, mish), computed with the functions MONAI's modules call; prelu, an ``nn.PReLU`` after
  each norm whose parameter has MONAI's key (``layers.relu1.weight``); and, as MONAI's factory, (a module class or
  other callable, {arguments}), made as MONAI makes it.

* **Module and parameter names** (``named_modules()``, ``named_parameters()``, ``get_submodule``): a dense layer's
  modules sit in its ``layers`` (``denselayer1.layers.norm1``, ``layers.dropout`` when there is dropout, the module
  applied), so code that freezes or groups parameters by name, or aims ``monai.visualize`` at a layer, works as is.

What is effidense's: the module types (a norm holds its statistics and reruns exactly in every memory mode); each
norm's activation is a module after it, by MONAI's names (``relu0``, ``relu1``, ``relu2``, ``transitionN.relu``, and
``class_layers.relu`` after ``norm5``). ``forward_features(x)`` and ``features(x)`` compute the features up to
``norm5``, as MONAI's ``features`` does.

What goes beyond MONAI's: ``pretrained=True`` starts DenseNet121/169/201 from torchvision's ImageNet weights in 2D
*and* 3D (MONAI refuses 3D), for any ``in_channels``: ``DenseNet121(spatial_dims=3, in_channels=1, out_channels=2,
pretrained=True)``. The kernels are inflated to 3D by I3D's mean, the first convolution gets the sum over RGB shared
out over ``in_channels``, the head is fresh; nothing else changes. The weights come from torchvision's cache or
timm's hub (:mod:`effidense.pretrained`).

MONAI itself is not needed to build, train, save or load these models; only its datasets and transforms, if you use
them. Bad input gets one line: a wrong rank or too small a volume (the least size is named), ``spatial_dims`` not 1-3,
an unknown ``norm`` or ``act``, ``pretrained=True`` where no weights exist or none are cached offline.
"""
from __future__ import annotations

import functools
import inspect
import sys
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import densenet
from .adapt import adapt_state_dict
from .arguments import check_fraction, check_positive
from .layers import (
    BATCH_NORM_ACT,
    INSTANCE_NORM_ACT,
    Activation,
    AdoptsNorms,
    GroupNormAct,
    SyncBatchNormAct,
    relu_,
)
from .pretrained import WeightsNotFoundError, torchvision_cache_file, torchvision_weights, unreachable_hub
from .weights import ConversionError, canonical_key, describe_misfit, is_activation_key, layout_key, layout_state_dict

__all__ = ["LAYOUT", "ACTIVATIONS", "NORMS", "Activation", "DenseNet", "DenseNet121", "DenseNet169", "DenseNet201",
           "DenseNet264", "Densenet", "Densenet121", "Densenet169", "Densenet201", "Densenet264",
           "WeightsMismatchError", "activation", "densenet121", "densenet169", "densenet201", "densenet264",
           "imagenet_weights"]

LAYOUT = "monai"  # the layout name in effidense.weights.KEY_RULES
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_ADAPTIVE_AVG = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}


class WeightsMismatchError(ConversionError, RuntimeError):
    """Weights that do not fit the model: one line naming the keys (in MONAI's names). A RuntimeError, as torch's
    ``load_state_dict`` raises, and a :class:`~effidense.weights.ConversionError` with ``unknown``, ``missing`` and
    ``mismatched`` holding every offending key."""


# --- activations: MONAI's names, the functions its modules call ---

def _relu(x: Tensor, inplace: bool = True) -> Tensor:
    return relu_(x)


def _leakyrelu(x: Tensor, negative_slope: float = 0.01, inplace: bool = False) -> Tensor:
    return F.leaky_relu(x, negative_slope, inplace)


def _elu(x: Tensor, alpha: float = 1.0, inplace: bool = False) -> Tensor:
    return F.elu(x, alpha, inplace)


def _celu(x: Tensor, alpha: float = 1.0, inplace: bool = False) -> Tensor:
    return F.celu(x, alpha, inplace)


def _selu(x: Tensor, inplace: bool = False) -> Tensor:
    return F.selu(x, inplace)


def _relu6(x: Tensor, inplace: bool = False) -> Tensor:
    return F.hardtanh(x, 0.0, 6.0, inplace)  # as nn.ReLU6


def _gelu(x: Tensor, approximate: str = "none") -> Tensor:
    return F.gelu(x, approximate=approximate)


def _sigmoid(x: Tensor) -> Tensor:
    return torch.sigmoid(x)


def _tanh(x: Tensor) -> Tensor:
    return torch.tanh(x)


def _swish(x: Tensor, alpha: float = 1.0) -> Tensor:
    return x * torch.sigmoid(alpha * x)  # as monai.networks.blocks.Swish


def _memswish(x: Tensor, inplace: bool = False) -> Tensor:
    return F.silu(x, inplace=inplace)  # as monai.networks.blocks.MemoryEfficientSwish


def _mish(x: Tensor, inplace: bool = False) -> Tensor:
    return F.mish(x, inplace=inplace)  # as monai.networks.blocks.Mish


ACTIVATIONS: dict[str, Callable[..., Tensor]] = {
    "relu": _relu, "leakyrelu": _leakyrelu, "elu": _elu, "celu": _celu, "selu": _selu, "relu6": _relu6,
    "gelu": _gelu, "sigmoid": _sigmoid, "tanh": _tanh, "swish": _swish, "memswish": _memswish, "mish": _mish,
}
_OTHER_ACTIVATIONS = {  # the rest of MONAI's Act factory, and why they cannot be a norm's activation here
    "prelu": "it has learnable parameters: the models make it a module after each norm",
    "softmax": "it is not elementwise", "logsoftmax": "it is not elementwise",
    "geglu": "it halves the channels",
}


class _Act:
    """One of MONAI's activations with its arguments: a plain callable, so a norm holds it without a submodule."""

    def __init__(self, name: str, kwargs: Mapping[str, Any]) -> None:
        self.name, self.fn, self.kwargs = name, ACTIVATIONS[name], dict(kwargs)

    def __call__(self, x: Tensor) -> Tensor:
        return self.fn(x, **self.kwargs)

    def __repr__(self) -> str:
        return f"{self.name}({', '.join(f'{k}={v!r}' for k, v in self.kwargs.items())})"


def _split(spec: Any, what: str) -> tuple[str, dict[str, Any]]:
    """MONAI's ``split_args``: a name, or (name, {arguments}); names in any case."""
    if isinstance(spec, str):
        return spec.lower(), {}
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], str) and isinstance(spec[1], dict) \
            and all(isinstance(k, str) for k in spec[1]):
        return spec[0].lower(), dict(spec[1])
    example = ("relu", {"inplace": True}) if what == "act" else ("group", {"num_groups": 8})
    raise ValueError(f"{what}={spec!r}: expected a name or (name, {{arguments}}), as MONAI takes it, e.g. {example!r}")


def _check_arguments(spec: Any, what: str, fn: Callable[..., Any], kwargs: Mapping[str, Any]) -> None:
    """Unknown arguments for ``fn`` in one line, where its signature names them all (a builtin without one, or one
    taking ``**kwargs``, says itself what is wrong when called)."""
    try:
        signature = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.values()):
        return
    params = [p for p in signature if p != "x"]
    unknown = [k for k in kwargs if k not in params]
    if unknown:
        takes = ", ".join(params) or "no arguments"
        raise ValueError(f"{what}={spec!r}: unknown argument {', '.join(map(repr, unknown))} ({takes} accepted)")


def activation(act: Any) -> Callable[[Tensor], Tensor] | None:
    """MONAI's ``act`` argument ('relu', or e.g. ``("leakyrelu", {"negative_slope": 0.1})``) as the function a norm
    applies: :func:`~effidense.layers.relu_` for 'relu' (whatever its ``inplace``), so the fast paths apply; None for
    '' (MONAI's Identity). Raises ValueError in one line for anything else."""
    name, kwargs = _split(act, "act")
    if name == "":
        return None
    if name not in ACTIVATIONS:
        why = _OTHER_ACTIVATIONS.get(name)
        problem = f"MONAI's {name!r} is not supported ({why})" if why else "unknown activation"
        raise ValueError(f"act={act!r}: {problem}; choose one of {', '.join(ACTIVATIONS)}")
    _check_arguments(act, "act", ACTIVATIONS[name], kwargs)
    return relu_ if name == "relu" else _Act(name, kwargs)


def _made(factory: Callable[..., nn.Module], kwargs: dict[str, Any]) -> nn.Module:
    return factory(**kwargs)  # as MONAI calls it: with its arguments alone, never an ``inplace`` of effidense's


def _activation_module(act: Any) -> Callable[..., nn.Module] | None:
    """What makes MONAI's ``act`` as a module after each norm: 'prelu' (``nn.PReLU``, which has a parameter, with
    MONAI's arguments), or what MONAI's factory also takes, (a class or other callable, {arguments}), e.g.
    ``(nn.LeakyReLU, {"negative_slope": 0.2})``; None for an activation by name, which :func:`activation` gives."""
    if isinstance(act, tuple) and len(act) == 2 and callable(act[0]) and isinstance(act[1], dict):
        _check_arguments(act, "act", act[0], act[1])
        return functools.partial(_made, act[0], dict(act[1]))
    name, kwargs = _split(act, "act")
    if name != "prelu":
        return None
    _check_arguments(act, "act", nn.PReLU, kwargs)
    return functools.partial(_made, nn.PReLU, kwargs)


# --- norms ---

NORMS: dict[str, tuple[str, ...]] = {  # MONAI's norm names supported here, and the arguments each takes
    "batch": ("eps", "momentum", "affine", "track_running_stats"),
    "syncbatch": ("eps", "momentum", "affine", "track_running_stats", "process_group"),
    "instance": ("eps", "momentum", "affine", "track_running_stats"),
    "group": ("num_groups", "eps", "affine"),
}
_OTHER_NORMS = {  # the rest of MONAI's Norm factory
    "layer": "no running-statistics-free exact form here", "localresponse": "not a DenseNet norm here",
    "": "a DenseNet needs its norms",
}

NormMaker = Callable[[int, Callable[[Tensor], Tensor] | None], nn.Module]


def _users_stacklevel() -> int:
    """``warnings.warn``'s stacklevel, in the function calling this, of the first frame outside effidense: the user's
    line, however many of effidense's constructors lie between."""
    frame, level = sys._getframe(2), 2
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] == "effidense":
        frame, level = frame.f_back, level + 1
    return level


def _norm_maker(norm: Any, spatial_dims: Any) -> NormMaker:
    """MONAI's ``norm`` argument as ``make(channels, act)``; checked now, built once ``spatial_dims`` is known good."""
    name, kwargs = _split(norm, "norm")
    if name == "instance_nvfuser":  # MONAI's own choice without apex's fused kernel, which effidense never uses
        warnings.warn("norm='instance_nvfuser': apex's InstanceNorm3dNVFuser is not used here; 'instance' instead, "
                      "as MONAI falls back without apex", UserWarning, stacklevel=_users_stacklevel())
        name = "instance"
    if name not in NORMS:
        hint = _OTHER_NORMS.get(name)
        problem = f"MONAI's {name!r} is not supported ({hint})" if hint else "unknown norm"
        raise ValueError(f"norm={norm!r}: {problem}; choose one of {', '.join(map(repr, NORMS))}")
    unknown = [k for k in kwargs if k not in NORMS[name]]
    if unknown:
        raise ValueError(f"norm={norm!r}: unknown argument {', '.join(map(repr, unknown))} "
                         f"({', '.join(NORMS[name])} accepted)")
    if name == "group" and "num_groups" not in kwargs:
        raise ValueError(f"norm={norm!r}: group norm needs num_groups, e.g. ('group', {{'num_groups': 8}})")

    def make(channels: int, act: Callable[[Tensor], Tensor] | None) -> nn.Module:
        try:
            if name == "group":
                rest = {k: v for k, v in kwargs.items() if k != "num_groups"}
                return GroupNormAct(kwargs["num_groups"], channels, act=act, **rest)
            if name == "syncbatch":
                return SyncBatchNormAct(channels, act=act, **kwargs)
            return (BATCH_NORM_ACT if name == "batch" else INSTANCE_NORM_ACT)[spatial_dims](channels, act=act,
                                                                                            **kwargs)
        except (TypeError, ValueError) as e:
            raise ValueError(f"norm={norm!r} cannot normalise {channels} channels: {e}") from None

    return make


# --- MONAI's module names: each dense layer's modules under `layers` ---

class _Layers(AdoptsNorms, nn.Sequential):
    """MONAI's ``_DenseLayer.layers``: the dense layer's modules, by MONAI's names and in MONAI's order (a norm that
    ``nn.SyncBatchNorm.convert_sync_batchnorm`` replaces here keeps its activation, as in the layer itself)."""


_DROPOUT = {1: nn.Dropout, 2: nn.Dropout2d, 3: nn.Dropout3d}  # MONAI's Dropout factory, by spatial_dims


class _DenseLayer(densenet.DenseLayer):
    """effidense's dense layer (same computation, same memory modes) whose modules sit in ``layers``, as MONAI's:
    ``named_modules()``, ``named_parameters()``, ``state_dict()`` and ``get_submodule`` all say
    ``denselayer1.layers.norm1``. The layer's own code still reaches them as ``self.norm1``."""

    def __getattr__(self, name: str) -> Any:
        layers = self.__dict__["_modules"].get("layers")
        if layers is not None and name in layers._modules:
            return layers._modules[name]
        return super().__getattr__(name)

    def _drawn_dropout(self) -> Callable[[Tensor], Tensor] | None:
        # MONAI's dropout module (layers.dropout) decides: its train/eval mode as forward finds it, and its p; the
        # core's dropout function is the module's own (whole channels in 2D and 3D, values in 1D)
        drawn, module = super()._drawn_dropout(), self.layers._modules.get("dropout")
        return None if drawn is None or module is None or not module.training else functools.partial(drawn, p=module.p)

    @classmethod
    def nest(cls, layer: densenet.DenseLayer, dropout_prob: float, spatial_dims: int) -> None:
        """Move ``layer``'s modules into ``layer.layers`` (the same objects, so nothing is re-initialised), add
        MONAI's dropout module when there is dropout, and make ``layer`` one of these."""
        layers = _Layers(OrderedDict(layer._modules))
        if dropout_prob > 0:
            layers.add_module("dropout", _DROPOUT[spatial_dims](dropout_prob))
        layer._modules.clear()
        layer.__class__ = cls
        layer.add_module("layers", layers)


# --- the model ---

def _misfit(state_dict: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]]) -> tuple[
        list[str], list[str], list[tuple[str, tuple[int, ...], tuple[int, ...]]]]:
    """The unknown, missing and mis-shaped keys of ``state_dict`` for a model whose shapes are ``expected``."""
    unknown = [k for k in state_dict if k not in expected]
    missing = [k for k in expected if k not in state_dict]
    mismatched = [(k, tuple(v.shape), expected[k]) for k, v in state_dict.items()
                  if k in expected and isinstance(v, Tensor) and tuple(v.shape) != expected[k]]
    return unknown, missing, mismatched


class DenseNet(densenet.DenseNet):
    """MONAI's ``DenseNet`` (monai.networks.nets, 1.6) with effidense's memory modes; see the module docstring.

    Args:
        spatial_dims: 1, 2 or 3: inputs (N, C, L), (N, C, H, W) or (N, C, D, H, W).
        in_channels: input channels.
        out_channels: classes (outputs of ``class_layers.out``).
        init_features: channels of the stem's convolution.
        growth_rate: new feature maps per dense layer (k).
        block_config: dense layers in each block.
        bn_size: bottleneck width factor (bn_size * k channels).
        act: activation, MONAI-style ('relu', or (name, {arguments})).
        norm: 'batch', 'instance' or 'group', MONAI-style (e.g. ``("group", {"num_groups": 8})``).
        dropout_prob: dropout on each dense layer's new features (whole channels in 2D and 3D, as MONAI's).
        memory: 'plain', 'efficient' (default) or 'frugal'; all compute the same function.
    """

    def __init__(
            self,
            spatial_dims: int,
            in_channels: int,
            out_channels: int,
            init_features: int = 64,
            growth_rate: int = 32,
            block_config: Sequence[int] = (6, 12, 24, 16),
            bn_size: int = 4,
            act: str | tuple = ("relu", {"inplace": True}),
            norm: str | tuple = "batch",
            dropout_prob: float = 0.0,
            *,
            memory: str = "efficient",
    ) -> None:
        # in MONAI's words (the core checks the rest, and these again, in its own)
        check_positive(in_channels=in_channels, out_channels=out_channels, init_features=init_features,
                       bn_size=bn_size)  # bn_size: MONAI's layers always have the bottleneck
        check_fraction("dropout_prob", dropout_prob)
        act_layer = _activation_module(act)
        act_fn = relu_ if act_layer is not None else activation(act)  # relu_: what act_layer replaces
        make_norm = _norm_maker(norm, spatial_dims)
        # MONAI draws each convolution's default initialisation, then the Linear's, then each convolution's Kaiming
        # normal: the core's own draws are undone, and MONAI's are made below in its order.
        with torch.random.fork_rng(devices=[]):
            super().__init__(growth_rate, block_config, init_features, bn_size, dropout_prob, num_classes=0,
                             in_chans=in_channels, global_pool="", memory=memory, spatial_dims=spatial_dims,
                             norm_layer=functools.partial(make_norm, act=act_fn), act_layer=act_layer,
                             drop_channels=spatial_dims in (2, 3))  # MONAI's Dropout: nn.Dropout in 1D
        relu = self.relu  # the activation after norm5 is MONAI's class_layers.relu
        del self.global_pool, self.classifier, self.head_drop, self.relu  # MONAI's head is class_layers
        self.feature_info[-1]["module"] = "features.norm5"
        convs = [m for m in self.modules() if isinstance(m, _CONVS)]
        for conv in convs:
            conv.reset_parameters()
        self.class_layers = nn.Sequential(OrderedDict([
            ("relu", relu),
            ("pool", _ADAPTIVE_AVG[spatial_dims](1)),
            ("flatten", nn.Flatten(1)),
            ("out", nn.Linear(self.num_features, out_channels)),
        ]))
        for conv in convs:
            nn.init.kaiming_normal_(conv.weight)
        nn.init.zeros_(self.class_layers.out.bias)
        self.num_classes = out_channels
        self.head_hidden_size = self.num_features
        for layer in [m for m in self.modules() if isinstance(m, densenet.DenseLayer)]:
            _DenseLayer.nest(layer, dropout_prob, spatial_dims)

    # --- MONAI's head ---
    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return self.class_layers[:-1](x) if pre_logits else self.class_layers(x)

    def forward(self, x: Tensor) -> Tensor:
        out = self.class_layers(self.forward_features(x))
        if type(x) is not Tensor and hasattr(type(x), "copy_meta_from") and type(out) is not type(x):
            # A sliced segment or a synchronised norm computes on the plain tensor (a MetaTensor result is a view
            # that holds its base); MONAI's model hands back a MetaTensor carrying the input's metadata, so this does.
            out = out.as_subclass(type(x))
            out.copy_meta_from(x)
        return out

    def get_classifier(self) -> nn.Module:
        return self.class_layers.out

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new ``class_layers.out`` for ``num_classes`` (0: none); ``global_pool`` 'avg' (MONAI's) or '' (none)."""
        if global_pool not in (None, "avg", ""):
            raise ValueError(f"global_pool must be 'avg' (MONAI's adaptive average) or '', got {global_pool!r}")
        if global_pool is not None:
            pooled = global_pool == "avg"
            self.class_layers.pool = _ADAPTIVE_AVG[self.spatial_dims](1) if pooled else nn.Identity()
            self.class_layers.flatten = nn.Flatten(1) if pooled else nn.Identity()
        weight = self.features.conv0.weight
        out = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        self.class_layers.out = out.to(device=weight.device, dtype=weight.dtype).train(self.training)
        self.num_classes = num_classes

    # --- MONAI's keys ---
    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict`` in MONAI's key names; weights that do not fit raise
        :class:`WeightsMismatchError`, one line naming every unknown, missing and mis-shaped key (a shape mismatch
        even when not ``strict``, as torch's)."""
        expected = {k: tuple(v.shape) for k, v in self.state_dict(keep_vars=True).items()}
        unknown, missing, mismatched = _misfit(state_dict, expected)
        if mismatched or (strict and (unknown or missing)):
            shapes = mismatched
            message = describe_misfit(unknown if strict else [], missing if strict else [], mismatched)
            # keys of another layout (torchvision's, timm's, effidense's) that MONAI's names would fit
            foreign = [k for k in unknown if layout_key(canonical_key(k), LAYOUT) in expected]
            if foreign:
                renamed = {layout_key(canonical_key(k), LAYOUT): v for k, v in state_dict.items()}
                unknown2, missing2, shapes = _misfit(renamed, expected)
                rest = describe_misfit(unknown2 if strict else [], missing2 if strict else [], shapes)
                message = (f"{len(foreign)} keys are in torchvision/timm/effidense names, not MONAI's (e.g. "
                           f"{foreign[0]!r}); write MONAI's with effidense convert --to monai or "
                           "effidense.convert.inflate(..., to='monai')")
                message += f"; in MONAI's names: {rest}" if rest else ""
            raise WeightsMismatchError(f"the weights do not fit {self._describe()}: {message}"
                                       f"{self._adapt_hint(shapes)}", unknown=unknown, missing=missing,
                                       mismatched=mismatched)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _adapt_hint(self, mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]) -> str:
        """What would make ImageNet-shaped weights fit: inflation, other input channels, a fresh head."""
        steps = []
        if any(len(want) == len(got) + 1 == self.spatial_dims + 2 for _, got, want in mismatched):
            steps.append(("--inflate mean", "to='monai'"))
        shapes = {k: (got, want) for k, got, want in mismatched}
        conv0 = shapes.get("features.conv0.weight")
        if conv0 and conv0[0][1] != conv0[1][1]:
            steps.append((f"--in-chans {self.in_chans}", f"in_chans={self.in_chans}"))
        head = shapes.get("class_layers.out.weight")
        if head and head[0][0] != head[1][0]:
            steps.append((f"--num-classes {self.num_classes}", f"num_classes={self.num_classes}"))
        if not steps:
            return ""
        flags = " ".join(flag for flag, _ in steps)
        args = ", ".join(["to='monai'", *(arg for _, arg in steps if arg != "to='monai'")])
        return (f" (adapt them first: effidense convert --to monai {flags}, or effidense.convert.inflate(..., {args}); "
                "for an ImageNet start, pretrained=True)")

    def _describe(self) -> str:
        """The model as a short constructor call, for messages."""
        return (f"effidense.monai.DenseNet(spatial_dims={self.spatial_dims}, in_channels={self.in_chans}, "
                f"out_channels={self.num_classes}, block_config={self.block_config})")


def _check_pretrained(pretrained: bool, name: str, spatial_dims: Any, norm: Any) -> None:
    """Refuse, before any work, an ImageNet start the weights cannot give."""
    if not pretrained:
        return
    if name == "densenet264":
        raise ValueError("pretrained=True: there are no ImageNet weights for DenseNet-264 (MONAI has none either)")
    if spatial_dims not in (2, 3):
        raise ValueError(f"pretrained=True: ImageNet weights start 2D and 3D models (inflated), not "
                         f"spatial_dims={spatial_dims!r}")
    if _split(norm, "norm")[0] not in ("batch", "syncbatch"):
        raise ValueError(f"pretrained=True: ImageNet weights come with BatchNorm statistics, so norm must be 'batch' "
                         f"(or 'syncbatch'), not {norm!r}")


def imagenet_weights(name: str, spatial_dims: int, in_chans: int, layout: str, progress: bool = True,
                     num_classes: int = 0, into: str = "model") -> dict[str, Tensor]:
    """torchvision's ImageNet weights of ``name`` (from torchvision's cache, else timm's hub or its cache, as
    ``effidense.densenet121(weights="tv_in1k")``), without their classifier, in ``layout``'s keys: inflated to 3D by
    I3D's mean for ``spatial_dims=3``, the first convolution adapted to ``in_chans`` (the sum over RGB, shared out).
    Where they cannot be had, one line says where they were looked for and how to convert them oneself (for a model
    of ``num_classes``, loaded into ``into``)."""
    from .registry import create

    try:
        with torch.random.fork_rng(devices=[]):  # the generator is left as after a random start
            imagenet = create(name, weights="tv_in1k", progress=progress).state_dict()
    except WeightsNotFoundError as e:
        file = torchvision_cache_file(torchvision_weights(name, "tv_in1k")).name
        raise WeightsNotFoundError(
            f"pretrained=True: no ImageNet weights for {name} offline, and {unreachable_hub()}; looked in "
            f"{e.places}. Put torchvision's {file} there, or convert it yourself: effidense convert --checkpoint "
            f"{file} --output w.pth --to {layout} --in-chans {in_chans} --num-classes {num_classes}"
            f"{' --inflate mean' if spatial_dims == 3 else ''}, then "
            f"{into}.load_state_dict(torch.load('w.pth', weights_only=True))", e.places) from None
    weights, _ = adapt_state_dict(imagenet, method="mean" if spatial_dims == 3 else None, in_chans=in_chans,
                                  num_classes=0)
    return layout_state_dict(weights, layout)


class _Pretrainable(DenseNet):
    """A numbered DenseNet, which ``pretrained=True`` starts from torchvision's ImageNet weights."""

    imagenet = ""  # the effidense.CONFIGS name of the ImageNet network

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, init_features: int, growth_rate: int,
                 block_config: Sequence[int], pretrained: bool, progress: bool, **kwargs: Any) -> None:
        _check_pretrained(pretrained, self.imagenet, spatial_dims, kwargs.get("norm", "batch"))
        super().__init__(spatial_dims, in_channels, out_channels, init_features, growth_rate, block_config, **kwargs)
        if pretrained:
            self.start_from_imagenet(progress)

    def start_from_imagenet(self, progress: bool = True) -> None:
        """Load torchvision's ImageNet weights, as :func:`imagenet_weights` makes them for this model, the head
        (``class_layers.out``) left as initialised. Nothing else changes."""
        weights = imagenet_weights(self.imagenet, self.spatial_dims, self.in_chans, LAYOUT, progress,
                                   num_classes=self.num_classes)
        # as MONAI's pretrained start: the head, and the activations' parameters (PReLU's, or those of a module of
        # one's own; ImageNet's ReLUs have none), are left as initialised
        weights.update((k, v) for k, v in self.state_dict().items()
                       if k.startswith("class_layers.out.") or is_activation_key(k))
        self.load_state_dict(weights, strict=True)


class DenseNet121(_Pretrainable):
    """MONAI's ``DenseNet121`` with effidense's memory modes; ``pretrained=True`` starts from torchvision's ImageNet
    weights for any ``spatial_dims`` 2 or 3 and ``in_channels`` (:meth:`start_from_imagenet`)."""

    imagenet = "densenet121"

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, init_features: int = 64,
                 growth_rate: int = 32, block_config: Sequence[int] = (6, 12, 24, 16), pretrained: bool = False,
                 progress: bool = True, **kwargs: Any) -> None:
        super().__init__(spatial_dims, in_channels, out_channels, init_features, growth_rate, block_config,
                         pretrained, progress, **kwargs)


class DenseNet169(_Pretrainable):
    """MONAI's ``DenseNet169`` with effidense's memory modes (``pretrained=True`` as DenseNet121's)."""

    imagenet = "densenet169"

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, init_features: int = 64,
                 growth_rate: int = 32, block_config: Sequence[int] = (6, 12, 32, 32), pretrained: bool = False,
                 progress: bool = True, **kwargs: Any) -> None:
        super().__init__(spatial_dims, in_channels, out_channels, init_features, growth_rate, block_config,
                         pretrained, progress, **kwargs)


class DenseNet201(_Pretrainable):
    """MONAI's ``DenseNet201`` with effidense's memory modes (``pretrained=True`` as DenseNet121's)."""

    imagenet = "densenet201"

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, init_features: int = 64,
                 growth_rate: int = 32, block_config: Sequence[int] = (6, 12, 48, 32), pretrained: bool = False,
                 progress: bool = True, **kwargs: Any) -> None:
        super().__init__(spatial_dims, in_channels, out_channels, init_features, growth_rate, block_config,
                         pretrained, progress, **kwargs)


class DenseNet264(_Pretrainable):
    """MONAI's ``DenseNet264`` with effidense's memory modes (no pretrained weights exist)."""

    imagenet = "densenet264"

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, init_features: int = 64,
                 growth_rate: int = 32, block_config: Sequence[int] = (6, 12, 64, 48), pretrained: bool = False,
                 progress: bool = True, **kwargs: Any) -> None:
        super().__init__(spatial_dims, in_channels, out_channels, init_features, growth_rate, block_config,
                         pretrained, progress, **kwargs)


# MONAI's aliases
Densenet = DenseNet
Densenet121 = densenet121 = DenseNet121
Densenet169 = densenet169 = DenseNet169
Densenet201 = densenet201 = DenseNet201
Densenet264 = densenet264 = DenseNet264
