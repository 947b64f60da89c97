"""The memory of one training step, counted storage by storage, on tensors that allocate nothing or on real ones.

:class:`StorageTracker` is a ``TorchDispatchMode``: every storage an operator's output holds is counted from the op
that makes it until its last reference dies (a weakref finalizer on the storage), independent of any allocator, so
the same count runs on real tensors and on ``FakeTensorMode``'s, which carry shapes, dtypes and strides but no data.
It sees what autograd's backward makes as well, the recompute buffers of non-reentrant checkpoints included.

:class:`StepProbe` builds a model once (under ``FakeTensorMode`` by default) with its optimizer state, and
:meth:`StepProbe.measure` runs one training step at a batch and input size under the tracker: zero_grad, forward
(under autocast if asked) with cross-entropy loss, backward, optimizer step. It returns a :class:`StepMemory`: the
peak, what was live at the peak by kind, and the bytes saved for backward counted by the meter
(:class:`effidense.SavedTensorMeter`'s rule). A DenseNet-121 step at any batch takes about two seconds of host time.

Not counted, on any device: what kernels allocate internally without returning it (cuDNN and cuBLAS workspaces,
im2col buffers), the CUDA context, allocator rounding and fragmentation, communication buffers. :mod:`effidense.planner`
names these and adds a safety margin.
"""
from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .memory import SavedTensorMeter

__all__ = ["OPTIMIZERS", "KINDS", "StorageTracker", "StepSpec", "StepMemory", "StepProbe"]

# Optimizers whose state a step holds: plain SGD has none, momentum one buffer per parameter, AdamW two (and a
# step count per parameter). "none" is bench's step: no optimizer update.
OPTIMIZERS = ("none", "sgd", "sgd-momentum", "adamw")
# What a live storage is, for the breakdown of the peak.
KINDS = ("parameters", "gradients", "optimizer_state", "input", "saved_activations", "transient")


def _key(t: torch.Tensor) -> int:
    """The identity of ``t``'s storage (its StorageImpl), valid for real and fake tensors alike while it lives."""
    return t.untyped_storage()._cdata


@dataclass
class _Record:
    nbytes: int
    kind: str
    born: int
    died: int | None = None


class StorageTracker(TorchDispatchMode):
    """Counts the bytes of live storages: those given to :meth:`add` and every one an op's output holds.

    ``current`` and ``peak`` are bytes; :meth:`at_peak` splits the peak by kind (see :data:`KINDS`). Storages are
    told apart by identity, so views and in-place results are counted once.
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._events = 0
        self._peak_event = 0
        self._records: list[_Record] = []
        self._live: dict[int, int] = {}  # storage key -> index in _records
        self._finalizers: list[weakref.finalize] = []

    def add(self, tensors: Iterable[Any], kind: str = "transient") -> None:
        """Count the storages of ``tensors`` (non-tensors are ignored) as ``kind`` from now on, if not yet counted."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._track(t, kind)

    def relabel(self, tensors: Iterable[Any], kind: str) -> None:
        """Mark the live storages of ``tensors`` as ``kind`` (e.g. the gradients autograd made)."""
        for t in tensors:
            if isinstance(t, torch.Tensor) and _key(t) in self._live:
                self._records[self._live[_key(t)]].kind = kind

    def relabel_keys(self, keys: Iterable[int], kind: str) -> None:
        for key in keys:
            if key in self._live:
                self._records[self._live[key]].kind = kind

    def _track(self, t: torch.Tensor, kind: str) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._live:
            return
        nbytes = storage.nbytes()
        self._events += 1
        self._live[key] = len(self._records)
        self._records.append(_Record(nbytes, kind, self._events))
        self._finalizers.append(weakref.finalize(storage, self._free, key))
        self.current += nbytes
        if self.current > self.peak:
            self.peak = self.current
            self._peak_event = self._events

    def _free(self, key: int) -> None:
        index = self._live.pop(key, None)
        if index is None:
            return
        self._events += 1
        record = self._records[index]
        record.died = self._events
        self.current -= record.nbytes

    @property
    def count(self) -> int:
        """Storages counted so far (live or freed)."""
        return len(self._records)

    def at_peak(self) -> dict[str, int]:
        """Bytes live at the peak, by kind (the values sum to ``peak``)."""
        split = dict.fromkeys(KINDS, 0)
        for r in self._records:
            if r.born <= self._peak_event and (r.died is None or r.died > self._peak_event):
                split[r.kind] = split.get(r.kind, 0) + r.nbytes
        return split

    def live_bytes(self, kind: str) -> int:
        return sum(self._records[i].nbytes for i in self._live.values() if self._records[i].kind == kind)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t, "transient")
        return out

    def close(self) -> None:
        """Stop following storages (the counts stay as they are)."""
        for f in self._finalizers:
            f.detach()
        self._finalizers.clear()


@dataclass(frozen=True)
class StepSpec:
    """What one training step runs besides the model: input channels, classes, precision, optimizer."""

    in_chans: int = 3
    num_classes: int = 1000
    amp: torch.dtype | None = None  # autocast dtype, None: no autocast
    dtype: torch.dtype = torch.float32  # the parameters' and the input's dtype
    optimizer: str = "sgd"

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")


@dataclass
class StepMemory:
    """One measured step: ``peak_bytes`` and, in bytes, what the step holds (see :data:`KINDS`)."""

    batch: int
    size: tuple[int, ...]
    peak_bytes: int
    at_peak: dict[str, int]
    parameter_bytes: int  # parameters and buffers
    gradient_bytes: int
    optimizer_state_bytes: int
    input_bytes: int
    saved_activation_bytes: int  # the meter's count for the forward
    end_bytes: int  # live after the step (parameters, buffers, optimizer state, gradients)


def _make_optimizer(name: str, params: list[nn.Parameter]) -> torch.optim.Optimizer | None:
    if name == "none":
        return None
    # foreach=True: torch's default on a GPU (on a CPU it defaults to one update per parameter), whose temporaries
    # are the size of all parameters rather than of one.
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-3, foreach=True)
    return torch.optim.SGD(params, lr=0.1, momentum=0.9 if name == "sgd-momentum" else 0.0, foreach=True)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


class StepProbe:
    """A model built once, on fake tensors (``fake=True``) or real ones, ready to measure training steps."""

    def __init__(self, build: Callable[[], nn.Module], step: StepSpec, fake: bool = True) -> None:
        self.step_spec = step
        self.fake = fake
        self._mode = FakeTensorMode() if fake else None
        with self._context(), _default_dtype(step.dtype):
            # Built in the dtype rather than converted: Module.to cannot swap fake parameters.
            model = build().train()
            self.model = model
            params = [p for p in model.parameters() if p.requires_grad]
            self.optimizer = _make_optimizer(step.optimizer, params)
            if self.optimizer is not None:  # the state a steady-state step starts with
                for p in params:
                    p.grad = torch.zeros_like(p)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)

    def _context(self) -> contextlib.AbstractContextManager:
        return self._mode if self._mode is not None else contextlib.nullcontext()

    def _batch(self, batch: int, size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        spec = self.step_spec
        x = torch.randn(batch, spec.in_chans, *size, dtype=spec.dtype)
        y = torch.randint(0, max(spec.num_classes, 1), (batch,))
        return x, y

    def _autocast(self) -> contextlib.AbstractContextManager:
        amp = self.step_spec.amp
        return torch.autocast("cpu", dtype=amp) if amp is not None else contextlib.nullcontext()

    def _state(self) -> list[torch.Tensor]:
        if self.optimizer is None:
            return []
        return [v for s in self.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]

    def saved_bytes(self, batch: int, size: Sequence[int]) -> int:
        """The meter's count for one training forward with its loss (no backward): what bench's depth sweep plots."""
        with self._context(), torch.enable_grad():
            x, y = self._batch(batch, size)
            with SavedTensorMeter(exclude=self.model) as meter:
                loss = self._loss(x, y)
            del loss
            return meter.bytes

    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            out = self.model(x)
        if out.dim() > 2:  # a segmentation model's logits: a label map, each sample's label at all its positions
            y = y.view(-1, *[1] * (out.dim() - 2)).expand(out.shape[:1] + out.shape[2:]).contiguous()
        return F.cross_entropy(out.float(), y)

    def measure(self, batch: int, size: Sequence[int]) -> StepMemory:
        """Track one training step at ``batch`` inputs of spatial ``size``."""
        size = tuple(int(s) for s in size)
        model = self.model
        with self._context(), torch.enable_grad():
            x, y = self._batch(batch, size)
            tracker = StorageTracker()
            tracker.add([*model.parameters(), *model.buffers()], "parameters")
            tracker.add(self._state(), "optimizer_state")
            tracker.add((x, y), "input")
            try:
                with tracker:
                    saved = self._forward_backward(tracker, x, y)
                    grads = [p.grad for p in model.parameters() if p.grad is not None]
                    gradient_bytes = sum(g.untyped_storage().nbytes() for g in grads)
                    if self.optimizer is not None:
                        self.optimizer.step()
                    del grads
                    end = tracker.current
                    model.zero_grad(set_to_none=True)
            finally:
                tracker.close()
            parameter_bytes = sum(t.untyped_storage().nbytes() for t in (*model.parameters(), *model.buffers()))
            return StepMemory(
                batch=batch, size=size, peak_bytes=tracker.peak, at_peak=tracker.at_peak(),
                parameter_bytes=parameter_bytes, gradient_bytes=gradient_bytes,
                optimizer_state_bytes=sum(t.untyped_storage().nbytes() for t in self._state()),
                input_bytes=x.untyped_storage().nbytes() + y.untyped_storage().nbytes(),
                saved_activation_bytes=saved, end_bytes=end)

    def _forward_backward(self, tracker: StorageTracker, x: torch.Tensor, y: torch.Tensor) -> int:
        self.model.zero_grad(set_to_none=True)
        with SavedTensorMeter(exclude=self.model) as meter:
            loss = self._loss(x, y)
        tracker.relabel_keys(meter.keys, "saved_activations")
        loss.backward()
        del loss
        tracker.relabel((p.grad for p in self.model.parameters()), "gradients")
        return meter.bytes
