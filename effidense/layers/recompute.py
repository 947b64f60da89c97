"""Where recomputation happens: the one call of ``torch.utils.checkpoint``, the rerun flag norms read, what a segment's
first run hands its rerun, the rerun a light Function differentiates under double backward, the tracing test that
bypasses them all, and the hooks that keep a module out of a light Function (:func:`hooked`).

A segment runs under non-reentrant ``torch.utils.checkpoint``: what it makes is dropped after forward and rebuilt in
backward by running it again. :func:`recomputing` tells code inside which run it is in, so that a norm updates its
running statistics on the first run only. A rerun computes with the parameters its first run found (those
``torch.func.functional_call`` gave, gone by backward; one changed in place since fails, as in plain), in the train/eval
and memory modes it found, and any other module's buffers (a norm put in one's place, spectral norm's vectors) are in a
rerun what the first run found, and after it what the first run left. :func:`handed` carries values the first run
computed (a synchronised norm's statistics) to the rerun, which reuses them instead of computing them again. While the
model is traced or exported (:func:`is_tracing`), and whenever autograd is not recording, segments simply run.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.autograd.forward_ad as forward_ad
import torch.fx
from timm.layers import FrozenBatchNormAct2d
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint, set_checkpoint_debug_enabled
from torchvision.ops.misc import FrozenBatchNorm2d

__all__ = ["backward_hooked", "checkpointed", "differentiable_rerun", "fx_leaf", "handed", "hooked",
           "is_tracing", "recomputing", "replay", "rerun", "rerunning", "run_mode"]

# ``is_fx_tracing`` is also true under torch.export (and warns about it); the precise test is newer than torch 2.4.
_is_fx_symbolic_tracing: Callable[[], bool] = getattr(
    torch.fx._symbolic_trace, "is_fx_symbolic_tracing", torch.fx._symbolic_trace.is_fx_tracing)
_state = threading.local()  # per thread: autograd reruns a segment on the thread that runs its backward
_FROZEN = (FrozenBatchNorm2d, FrozenBatchNormAct2d)  # norms whose buffers no run changes: a rerun need not replay them


def is_tracing() -> bool:
    """True while the model is traced or exported for another tool (``torch.fx``, ``torch.export`` and so ONNX,
    ``torch.jit.trace``), which gains nothing from recomputation, or transformed by ``torch.func`` (``grad``, ``vmap``,
    ``jvp``: per-sample gradients), which takes neither saved-tensor hooks nor these autograd Functions, or
    differentiated in forward mode (``torch.autograd.forward_ad``), which these Functions do not define: the model then
    runs as the plain one, on torch's own ops. ``torch.compile`` is not: it compiles the memory-efficient path,
    checkpoints included."""
    if torch.compiler.is_compiling():  # dynamo or export; under dynamo nothing after this is evaluated
        # Dynamo in torch 2.11 folds is_exporting() to True under torch.compile too, so the flag itself is read.
        return torch.compiler.is_exporting() and getattr(torch.compiler, "_is_exporting_flag", True)
    transformed = torch._C._functorch.peek_interpreter_stack() is not None or forward_ad._current_level >= 0
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


def rerunning() -> bool:
    """True where a module runs again only to be recomputed: while a segment is rerun (:func:`recomputing`), or while
    autograd runs a backward pass, under a checkpoint of one's own around the model's modules
    (``torch.utils.checkpoint``, FSDP's ``apply_activation_checkpointing``) as much as under this package's."""
    return not torch.compiler.is_compiling() and (
        getattr(_state, "rerun", None) is not None or torch._C._current_graph_task_id() != -1)


def handed() -> list | None:
    """Within a checkpointed segment, the list its first run appends to, and in its rerun a copy of that list to
    ``pop(0)`` from, in the same order; None outside segments."""
    replay = getattr(_state, "rerun", None)
    return replay if replay is not None else getattr(_state, "handing", None)


def _replay(module: nn.Module, args: Any) -> None:
    """Called before each module in a segment's run, for the state of the module and of every module it holds (a
    fake-quantiser updates its observer's buffers without calling it): parameters, buffers, train/eval and memory
    modes. A first run notes what it finds, the buffers' values and the parameters' versions. A rerun notes what it
    finds, to put back at its end, and hands the modules the first run's: so it computes with the weights forward was
    given (``torch.func.functional_call``'s, gone once the call returns), in forward's modes (``model.eval()`` or
    ``set_memory`` may come before backward), and updates buffers alike (a norm put in one's place its running
    statistics once, spectral norm's power iteration and an observer's averages move once). A parameter changed in
    place since fails, as where the plain model saved it. The buffers of :class:`~.norm.BatchNormAct`, which updates
    nothing in a rerun, and of frozen norms hold no values to replay."""
    state = getattr(_state, "replay", None)
    if state is None:
        return
    first, now = state
    seen = first if now is None else now
    for owner in module.modules() if module._modules else (module,):
        for table, items in _state_of(owner):
            for name, value in items:
                key = id(table), name
                if value is None or key in seen:  # noted at its first sight in the run
                    continue
                if now is None:  # a buffer's value to replay, or a parameter's version to check (noted at the end)
                    first[key] = value, value._version if table is owner._parameters else value.clone() if \
                        table is owner._buffers and not _reruns_exactly(owner) else None
                    continue
                used, found = first.get(key, (value, None))
                if isinstance(found, int):
                    if used._version != found:
                        raise RuntimeError(
                            "one of the variables needed for gradient computation has been modified by an inplace "
                            f"operation: {name} of {type(owner).__name__}, [{used.type()} {list(used.shape)}], is at "
                            f"version {used._version}; expected version {found} instead (changed after forward and "
                            "before backward reran its segment)")
                    found = None
                now[key] = table, name, value, used, None if found is None else used.clone()
                if found is not None:
                    _load(used, found)
                table[name] = used


def _state_of(owner: nn.Module) -> Iterator[tuple[dict, Iterable[tuple[str, Any]]]]:
    """What a rerun replays of a module, by where it is kept: its parameters, its buffers, its train/eval mode and the
    attributes its class names in ``rerun_state`` (effidense's memory mode)."""
    yield owner._parameters, owner._parameters.items()
    if owner._buffers:
        yield owner._buffers, owner._buffers.items()
    names = ("training", *getattr(type(owner), "rerun_state", ()))
    yield owner.__dict__, [(name, owner.__dict__.get(name)) for name in names]


def _reruns_exactly(owner: nn.Module) -> bool:
    return getattr(owner, "reruns_exactly", False) or isinstance(owner, _FROZEN)


def _load(buffer: Tensor, value: Tensor) -> Tensor:
    """``buffer``, holding ``value``'s values, also where a run resized it (an observer's first call does)."""
    return buffer.copy_(value) if buffer.shape == value.shape else buffer.set_(value.clone())


class _Run:
    """Enters a segment's first run (``rerun=False``) or a rerun, which starts from the tensors the first run found
    (``first``, shared by the two) and ends with those the first run left: reusable, since a segment reruns once per
    backward that needs it (``retain_graph=True``)."""

    def __init__(self, values: list, rerun: bool, first: dict | None = None, owner: Any = None) -> None:
        self.values, self.rerun, self.first, self.owner = values, rerun, {} if first is None else first, owner

    def __enter__(self) -> None:
        self.saved = getattr(_state, "rerun", None), getattr(_state, "handing", None), getattr(_state, "replay", None)
        if self.rerun:
            _state.rerun, _state.handing, _state.replay = list(self.values), None, (self.first, {})
        else:
            _state.rerun, _state.handing, _state.replay = None, self.values, (self.first, None)
        self.hook = nn.modules.module.register_module_forward_pre_hook(_replay)
        if isinstance(self.owner, nn.Module):  # a method of it runs: nothing calls it
            try:
                _replay(self.owner, ())
            except BaseException:  # a weight changed in place: leave no hook behind
                self.__exit__()
                raise

    def __exit__(self, *exc: object) -> None:
        self.hook.remove()
        if self.rerun:
            for table, name, found, used, left in _state.replay[1].values():
                if left is not None:
                    _load(used, left)
                table[name] = found
        else:  # the versions forward left: a module may change its own parameters in place as it runs
            for key, (tensor, found) in self.first.items():
                if isinstance(found, int):
                    self.first[key] = tensor, tensor._version
        _state.rerun, _state.handing, _state.replay = self.saved


def replay(module: nn.Module) -> None:
    """In a segment's run, hand ``module`` (and the modules it holds) what its call would: for a module the rerun reads
    without calling it."""
    _replay(module, ())


def rerun(used: Iterable[tuple[nn.Module, str, Any]] = ()) -> _Run:
    """Marks what runs inside as a rerun (:func:`recomputing` is true), for code that reruns a segment itself; the
    modules' parameters and modes named in ``used`` (``"training"``) are the values given there, as forward found
    them."""
    tables = ((m._parameters if name in m._parameters else m.__dict__, name, value) for m, name, value in used)
    return _Run([], rerun=True, first={(id(table), name): (value, None) for table, name, value in tables})


def differentiable_rerun(ctx: Any, grad: Tensor, run: Callable[..., Tensor], before: tuple[Tensor | None, ...],
                         maps: tuple[Tensor, ...], after: tuple[Tensor | None, ...] = (),
                         used: Sequence[tuple[nn.Module, str, Any]] = ()) -> tuple[Tensor | None, ...]:
    """Gradients under ``create_graph=True``: those of ``run(*maps)``, a rerun of forward (under its autocast state,
    updating no running statistics, modules' parameters and modes named in ``used`` as forward found them) with a
    graph of its own, so a second backward works. ``apply`` took ``before``, ``maps``, ``after``. Each map is read
    through a view, so where one map was computed from another neither picks up the other's path, which the outer
    backward follows anyway."""
    views = tuple(m.view_as(m) for m in maps)
    enabled, dtype = ctx.autocast
    with rerun(used), torch.autocast(grad.device.type, dtype=dtype, enabled=enabled):
        out = run(*views)
    needs = ctx.needs_input_grad
    wanted = [t for t, need in zip((*before, *views, *after), needs, strict=False) if need]
    grads = iter(torch.autograd.grad(out, wanted, grad, create_graph=True, allow_unused=True))
    return tuple(next(grads) if need else None for need in needs)


def _first_run_and_rerun(values: list, owner: Any) -> tuple[_Run, _Run]:
    first: dict = {}
    return _Run(values, rerun=False, first=first, owner=owner), _Run(values, rerun=True, first=first, owner=owner)


def checkpointed(enabled: bool, fn: Callable[..., Any], *tensors: Tensor, random: bool = False) -> Any:
    """``fn(*tensors)``, dropped after forward and rerun in backward when ``enabled`` (and autograd records).

    Tensors go in as separate arguments: checkpoint keeps those properly. ``random`` segments (dropout) replay their
    RNG state. Segments save the same tensors when rerun (the norms see to it), so checkpoint's metadata check, ~7% of
    an efficient step's host time, is skipped, and with it checkpoint's debug mode, which takes no ``context_fn``
    (``set_checkpoint_debug_enabled(True)`` applies to checkpoints of one's own, not these). Under torch.compile no
    rerun flag is needed (a compiled graph applies buffer updates once) and dynamo accepts no ``context_fn`` of this
    kind.
    """
    if not enabled or not torch.is_grad_enabled() or is_tracing():
        return fn(*tensors)
    if torch.compiler.is_compiling():
        return checkpoint(fn, *tensors, use_reentrant=False, preserve_rng_state=random, determinism_check="none")
    values: list = []
    with set_checkpoint_debug_enabled(None):
        return checkpoint(fn, *tensors, use_reentrant=False, preserve_rng_state=random, determinism_check="none",
                          context_fn=lambda: _first_run_and_rerun(values, getattr(fn, "__self__", None)))
