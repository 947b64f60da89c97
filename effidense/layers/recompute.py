"""Where recomputation happens: the one call of ``torch.utils.checkpoint``, the rerun flag that norms read, and the
tracing test that bypasses both.

A segment runs under non-reentrant ``torch.utils.checkpoint``: what it makes is dropped after forward and rebuilt in
backward by running it again. :func:`recomputing` tells code inside the segment which run it is in, so that a norm
updates its running statistics on the first run only (:mod:`effidense.layers.norm`). While the model is traced or
exported for another tool (:func:`is_tracing`), and whenever autograd is not recording, segments simply run: a graph
handed to another tool gains nothing from recomputation, and ``torch.fx`` cannot trace through it.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
from torch import Tensor
from torch.utils.checkpoint import checkpoint

__all__ = ["checkpointed", "fx_leaf", "is_tracing", "recomputing", "rerun", "run_mode"]

# ``is_fx_tracing`` is also true under torch.export (and warns about it); the precise test is newer than torch 2.4.
_is_fx_symbolic_tracing: Callable[[], bool] = getattr(
    torch.fx._symbolic_trace, "is_fx_symbolic_tracing", torch.fx._symbolic_trace.is_fx_tracing)

# Per thread: autograd reruns a segment on the thread that runs its backward.
_state = threading.local()


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


def fx_leaf(module: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.fx.Proxy | None:
    """Under ``torch.fx`` symbolic tracing (``args[0]`` a Proxy), ``module``'s call as one node named by its path, as
    torch.nn's own layers appear (``features.norm0``, ``features.pool0``); the graph then runs this very forward.
    None otherwise. Any fx tracer takes it (torchvision's ``create_feature_extractor``, timm's ``feature_cls='fx'``)."""
    if not isinstance(args[0], torch.fx.Proxy):
        return None
    tracer = args[0].tracer
    return tracer.create_proxy("call_module", tracer.path_of_module(module), args, kwargs)


def run_mode(memory: str) -> str:
    """The memory mode a forward runs in: ``memory``, or 'plain' while tracing or when autograd is not recording
    (nothing is kept for backward then, so there is nothing to recompute)."""
    if memory == "plain":  # the common case answers without asking torch: plain's host time is torchvision's
        return memory
    return memory if torch.is_grad_enabled() and not is_tracing() else "plain"


def recomputing() -> bool:
    """True while a segment is rerun in backward (never in compiled code, where no rerun flag is set)."""
    return not torch.compiler.is_compiling() and getattr(_state, "rerun", False)


class _Rerun:
    """Marks a rerun; reusable, since a segment reruns once per backward that needs it (``retain_graph=True``)."""

    def __enter__(self) -> None:
        self.previous, _state.rerun = recomputing(), True

    def __exit__(self, *exc: object) -> None:
        _state.rerun = self.previous


def rerun() -> contextlib.AbstractContextManager:
    """Marks what runs inside as a rerun (:func:`recomputing` is true), for code that reruns a segment itself."""
    return _Rerun()


def _contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    return contextlib.nullcontext(), rerun()


def checkpointed(enabled: bool, fn: Callable[..., Any], *tensors: Tensor, random: bool = False) -> Any:
    """``fn(*tensors)``, dropped after forward and rerun in backward when ``enabled`` (and autograd records).

    Tensors go in as separate arguments: checkpoint keeps those properly, a list would be held by reference only.
    ``random`` segments (dropout) replay their RNG state when rerun. Segments are deterministic and save the same
    tensors when rerun (the norms see to it), so checkpoint's per-tensor metadata check is skipped: it costs ~7% of an
    efficient step's host time. Under torch.compile the rerun flag is not needed (a compiled graph applies buffer
    updates once, however its partitioner recomputes) and dynamo accepts no ``context_fn`` of this kind.
    """
    if not enabled or not torch.is_grad_enabled() or is_tracing():
        return fn(*tensors)
    contexts = {} if torch.compiler.is_compiling() else {"context_fn": _contexts}
    return checkpoint(fn, *tensors, use_reentrant=False, preserve_rng_state=random, determinism_check="none",
                      **contexts)
