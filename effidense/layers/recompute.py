"""Where recomputation happens: the one call of ``torch.utils.checkpoint``, the rerun flag norms read, what a segment's
first run hands its rerun, the tracing test that bypasses them all, and the hooks that keep a module out of a light
Function (:func:`hooked`).

A segment runs under non-reentrant ``torch.utils.checkpoint``: what it makes is dropped after forward and rebuilt in
backward by running it again. :func:`recomputing` tells code inside which run it is in, so that a norm updates its
running statistics on the first run only; a rerun puts back the buffers of any other module it runs (a norm put in
one's place), which so updates them once too. :func:`handed` carries values the first run computed (a synchronised
norm's statistics) to the rerun, which reuses them instead of computing them again. While the model is traced or
exported (:func:`is_tracing`), and whenever autograd is not recording, segments simply run.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = ["backward_hooked", "checkpointed", "fx_leaf", "handed", "hooked", "is_tracing", "recomputing", "rerun",
           "run_mode"]

# ``is_fx_tracing`` is also true under torch.export (and warns about it); the precise test is newer than torch 2.4.
_is_fx_symbolic_tracing: Callable[[], bool] = getattr(
    torch.fx._symbolic_trace, "is_fx_symbolic_tracing", torch.fx._symbolic_trace.is_fx_tracing)
_state = threading.local()  # per thread: autograd reruns a segment on the thread that runs its backward


def is_tracing() -> bool:
    """True while the model is traced or exported for another tool (``torch.fx``, ``torch.export`` and so ONNX,
    ``torch.jit.trace``), which gains nothing from recomputation, or transformed by ``torch.func`` (``grad``, ``vmap``,
    ``jvp``: per-sample gradients), which takes neither saved-tensor hooks nor these autograd Functions: the model then
    runs as the plain one. ``torch.compile`` is not: it compiles the memory-efficient path, checkpoints included."""
    if torch.compiler.is_compiling():  # dynamo or export; under dynamo nothing after this is evaluated
        # Dynamo in torch 2.11 folds is_exporting() to True under torch.compile too, so the flag itself is read.
        return torch.compiler.is_exporting() and getattr(torch.compiler, "_is_exporting_flag", True)
    transformed = torch._C._functorch.peek_interpreter_stack() is not None
    return _is_fx_symbolic_tracing() or torch.jit.is_tracing() or transformed


def backward_hooked(*modules: Any) -> bool:
    """Whether any of ``modules`` has backward hooks, its own or every module's: they fire only where autograd records
    the module's call, never inside a light Function's forward, so such a module runs as the plain model runs it."""
    if nn.modules.module._global_backward_hooks or nn.modules.module._global_backward_pre_hooks:
        return True
    return any(isinstance(m, nn.Module) and bool(m._backward_hooks or m._backward_pre_hooks) for m in modules)


def hooked(*modules: Any) -> bool:
    """Whether any of ``modules`` has hooks, which fire only where it is called (backward hooks: where autograd
    records the call), and may change what it computes: then it is called, rather than taken apart."""
    return backward_hooked(*modules) or any(
        isinstance(m, nn.Module) and bool(m._forward_hooks or m._forward_pre_hooks) for m in modules)


def fx_leaf(module: torch.nn.Module, *args: Any) -> torch.fx.Proxy | None:
    """Under ``torch.fx`` symbolic tracing, ``module``'s call as one node named by its path, as torch.nn's layers
    appear (``features.norm0``); the graph then runs this very forward. None otherwise."""
    if not isinstance(args[0], torch.fx.Proxy):
        return None
    tracer = args[0].tracer
    return tracer.create_proxy("call_module", tracer.path_of_module(module), args, {})


def run_mode(memory: str) -> str:
    """The mode a forward runs in: ``memory``, or 'plain' while tracing or when autograd is not recording."""
    if memory == "plain":  # answers without asking torch: plain's host time is torchvision's
        return memory
    return memory if torch.is_grad_enabled() and not is_tracing() else "plain"


def recomputing() -> bool:
    """True while a segment is rerun in backward (never in compiled code, where no rerun flag is set)."""
    return not torch.compiler.is_compiling() and getattr(_state, "rerun", None) is not None


def handed() -> list | None:
    """Within a checkpointed segment, the list its first run appends to, and in its rerun a copy of that list to
    ``pop(0)`` from, in the same order; None outside segments."""
    replay = getattr(_state, "rerun", None)
    return replay if replay is not None else getattr(_state, "handing", None)


def _keep_buffers(module: nn.Module, args: Any) -> None:
    """Called before each module in a rerun: its buffers as they are, for the rerun's end to put back. A module that
    updates buffers as it runs (a norm's running statistics, other than :class:`~.norm.BatchNormAct`'s, which a rerun
    never updates) then updates them once a step, as in the plain model."""
    kept = getattr(_state, "kept", None)
    if kept is not None and not getattr(module, "reruns_exactly", False):
        for name, buffer in module._buffers.items():
            if buffer is not None:
                kept.setdefault((id(module), name), (module, name, buffer, buffer.clone()))


class _Run:
    """Enters a segment's first run (``rerun=False``) or a rerun, whose end puts back every buffer the rerun changed:
    reusable, since a segment reruns once per backward that needs it (``retain_graph=True``)."""

    def __init__(self, values: list, rerun: bool) -> None:
        self.values, self.rerun = values, rerun

    def __enter__(self) -> None:
        self.saved = getattr(_state, "rerun", None), getattr(_state, "handing", None), getattr(_state, "kept", None)
        if self.rerun:
            _state.rerun, _state.handing, _state.kept = list(self.values), None, {}
            self.hook = nn.modules.module.register_module_forward_pre_hook(_keep_buffers)
        else:
            _state.rerun, _state.handing, _state.kept = None, self.values, None

    def __exit__(self, *exc: object) -> None:
        if self.rerun:
            self.hook.remove()
            for module, name, buffer, value in _state.kept.values():
                module._buffers[name] = buffer.copy_(value)
        _state.rerun, _state.handing, _state.kept = self.saved


def rerun() -> _Run:
    """Marks what runs inside as a rerun (:func:`recomputing` is true), for code that reruns a segment itself."""
    return _Run([], rerun=True)


def checkpointed(enabled: bool, fn: Callable[..., Any], *tensors: Tensor, random: bool = False) -> Any:
    """``fn(*tensors)``, dropped after forward and rerun in backward when ``enabled`` (and autograd records).

    Tensors go in as separate arguments: checkpoint keeps those properly. ``random`` segments (dropout) replay their
    RNG state. Segments save the same tensors when rerun (the norms see to it), so checkpoint's metadata check, ~7% of
    an efficient step's host time, is skipped. Under torch.compile no rerun flag is needed (a compiled graph applies
    buffer updates once) and dynamo accepts no ``context_fn`` of this kind.
    """
    if not enabled or not torch.is_grad_enabled() or is_tracing():
        return fn(*tensors)
    values: list = []
    contexts = {} if torch.compiler.is_compiling() else {
        "context_fn": lambda: (_Run(values, rerun=False), _Run(values, rerun=True))}
    return checkpoint(fn, *tensors, use_reentrant=False, preserve_rng_state=random, determinism_check="none",
                      **contexts)
