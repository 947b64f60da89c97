"""The traceable forward: what ``torch.fx``, ``torch.export``, ONNX export and ``torch.jit.trace`` see.

Eager runs (and ``torch.compile``) use the exact memory-efficient path of :mod:`effidense.densenet`: recomputation
under ``torch.utils.checkpoint`` with running statistics updated once, pooling that keeps nothing. None of
that is worth anything in a graph handed to another tool, and some of it cannot be traced symbolically (the input
shape check, custom autograd functions, data-dependent branches). So while a model is traced or exported it runs as
the plain DenseNet it is equivalent to, built from its own modules: ``nn.BatchNorm2d`` on each concatenation, ReLU,
convolutions, ``F.max_pool2d``/``F.avg_pool2d``, no checkpointing; the memory mode means nothing there.

The graph therefore has standard BatchNorm semantics (batch statistics and one running-statistics update per norm
in training, running statistics in evaluation), which are exactly what the efficient path computes. Under
``torch.fx`` BatchNorm is a leaf module, so tracing itself executes nothing and touches no buffer.

Under ``torch.fx`` the dense blocks, layers and transitions are entered through the tracer, so nodes carry their
module's name: torchvision's ``create_feature_extractor`` and timm's ``features_only=True, feature_cls='fx'`` find the
feature maps named in ``feature_info`` (``features.norm0``, ``features.denseblockN``, ``features.norm5``).
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from .densenet import DenseBlock, DenseLayer, DenseNet, Transition

__all__ = ["is_tracing", "forward_traceable", "SCRIPTING_UNSUPPORTED"]

SCRIPTING_UNSUPPORTED = (
    "effidense's DenseNet does not support TorchScript (torch.jit.script), which PyTorch deprecates: use "
    "torch.export.export, torch.onnx.export or torch.compile, or torch.jit.trace for a TorchScript module")

# ``is_fx_tracing`` is also true under torch.export (and warns about it); the precise test is newer than torch 2.4.
_is_fx_symbolic_tracing: Callable[[], bool] = getattr(
    torch.fx._symbolic_trace, "is_fx_symbolic_tracing", torch.fx._symbolic_trace.is_fx_tracing)


def is_tracing() -> bool:
    """True while the model is traced or exported for another tool: ``torch.fx`` symbolic tracing, ``torch.export``
    (strict or not, and so ONNX's dynamo exporter) and ``torch.jit.trace`` (ONNX's TorchScript exporter).

    ``torch.compile`` is not: it compiles the exact memory-efficient path, checkpoints included.
    """
    if torch.compiler.is_compiling():  # dynamo or export; under dynamo nothing after this is evaluated
        # torch.export sets this flag around tracing. Dynamo in torch 2.11 (not 2.14) folds is_exporting() to True
        # under torch.compile too, so the flag itself is read (dynamo reads it as the constant it is at trace time).
        return torch.compiler.is_exporting() and getattr(torch.compiler, "_is_exporting_flag", True)
    return _is_fx_symbolic_tracing() or torch.jit.is_tracing()


def _call(tracer: torch.fx.Tracer | None, module: nn.Module, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(module, *args)`` as a call of ``module``: under ``torch.fx`` through the tracer, which then names the nodes
    ``fn`` makes after ``module`` (the module's own forward is the exact eager path, so it is not the one called)."""
    if tracer is None:
        return fn(module, *args)
    return tracer.call_module(module, functools.partial(fn, module), args, {})


def _relu_named(x: Tensor) -> Tensor:
    """In-place ReLU on a norm's output, for the feature maps named after a norm (``features.norm0``,
    ``features.norm5``): the norm's node then holds the map after ReLU, as in timm's BatchNormAct2d. The aten op is
    used because fx's dead-code elimination keeps it (it mutates its input) when nothing reads its result."""
    return torch.ops.aten.relu_.default(x)


def _layer(layer: DenseLayer, features: list[Tensor]) -> Tensor:
    x = torch.cat(features, 1) if len(features) > 1 else features[0]
    x = layer.conv1(F.relu(layer.norm1(x)))
    if layer.bottleneck:
        x = layer.conv2(F.relu(layer.norm2(x)))
    if layer.drop_rate > 0:
        x = F.dropout(x, layer.drop_rate, layer.training)
    return x


def _block(block: DenseBlock, x: Tensor, tracer: torch.fx.Tracer | None) -> Tensor:
    features = [x]
    for layer in block.values():
        features.append(_call(tracer, layer, _layer, features))
    return torch.cat(features, 1)  # the block's last node: its feature map for create_feature_extractor


def _transition(transition: Transition, x: Tensor) -> Tensor:
    return F.avg_pool2d(transition.conv(F.relu(transition.norm(x))), 2)


def forward_traceable(model: DenseNet, x: Tensor, taps: Collection[int] = (),
                      stop: int | None = None) -> tuple[Tensor, list[Tensor]]:
    """:meth:`DenseNet._forward` as the plain model computes it, from standard modules and no data-dependent
    branches: feature map ``stop`` (default the last the network has) and the maps numbered in ``taps``."""
    tracer = x.tracer if isinstance(x, torch.fx.Proxy) else None
    stop = model._last_index if stop is None else min(stop, model._last_index)
    # Under fx shapes are graph nodes, and torch.jit.trace would warn that the check is not recorded; elsewhere
    # (torch.export) they are concrete or symbolic integers.
    if tracer is None and not torch.jit.is_tracing():
        model._check_input(x, stop)
    features, tapped = model.features, []
    x = features.conv0(x)
    if not model.small_inputs:
        x = _relu_named(features.norm0(x))
    if 0 in taps:
        tapped.append(x)
    if stop == 0:
        return x, tapped
    if not model.small_inputs:
        x = F.max_pool2d(x, 3, 2, 1)
    last = len(model.block_config)
    for i in range(1, last + 1):
        block = features.get_submodule(f"denseblock{i}")
        x = _call(tracer, block, functools.partial(_block, tracer=tracer), x)
        if i == last:
            break
        if i in taps:
            tapped.append(x)
        if i == stop:
            return x, tapped
        transition = features.get_submodule(f"transition{i}")
        x = _call(tracer, transition, _transition, x)
    x = _relu_named(features.norm5(x))
    if last in taps:
        tapped.append(x)
    return x, tapped
