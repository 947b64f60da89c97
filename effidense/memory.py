"""The one memory meter of effidense: one count of storages, with two views.

:class:`StorageCount` is the count both views share: storages told apart by identity, each counted once however many
tensors view it, some left out (a model's parameters and buffers).

* :class:`SavedTensorMeter` counts the bytes autograd keeps for backward while a forward pass runs: every tensor that
  reaches ``save_for_backward`` (directly or through a non-reentrant checkpoint's saved inputs), with the model's
  parameters and buffers left out. The count is deterministic and device-independent, so tests can assert on it.
* :class:`StorageTracker` is a ``TorchDispatchMode`` that follows every storage an operator's output holds from the op
  that makes it until its last reference dies (a weak reference's callback on the storage), independent of any
  allocator, so the same count runs on real tensors and on ``FakeTensorMode``'s, which carry shapes, dtypes and
  strides but no data. It sees what autograd's backward makes as well, the recompute buffers of non-reentrant
  checkpoints included: the peak of a training step (:mod:`effidense.harness.footprint`). A model of a device's
  kernels may add the scratch they take inside themselves (:mod:`effidense.planner.scratch`).

A step's peak is the allocator's: ``cuda_peak_bytes`` on a GPU, ``cpu_peak_bytes`` on the CPU (its memory events,
which see the scratch kernels allocate inside themselves, as no count of tensors does).
"""
from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .densenet import DenseLayer

__all__ = ["MiB", "KINDS", "StorageCount", "SavedTensorMeter", "StorageTracker", "saved_activation_bytes",
           "cuda_peak_bytes", "activation_floor_bytes", "storage_key"]

MiB = 1024 * 1024
# What a live storage is, for the breakdown of a step's peak.
KINDS = ("parameters", "gradients", "optimizer_state", "input", "saved_activations", "transient", "scratch")

StorageKey = tuple[str, int]


def storage_key(t: torch.Tensor) -> StorageKey:
    """The identity of ``t``'s storage while it lives: its StorageImpl, not its data pointer (fake tensors all have a
    data pointer of 0, and reading it is deprecated for them)."""
    return str(t.device), t.untyped_storage()._cdata


class StorageCount:
    """Bytes of storages, each counted once however many tensors (views, in-place results) share it; the storages
    of ``exclude`` are never counted."""

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self.excluded = {storage_key(t) for t in exclude}
        self.sizes: dict[StorageKey, int] = {}

    def add(self, t: torch.Tensor) -> StorageKey | None:
        """Count ``t``'s storage at its size now (unless excluded); its key when it was not counted before."""
        key = storage_key(t)
        if key in self.excluded:
            return None
        new = key not in self.sizes
        self.sizes[key] = t.untyped_storage().nbytes()
        return key if new else None

    def remove(self, key: StorageKey) -> None:
        self.sizes.pop(key, None)

    def clear(self) -> None:
        self.sizes.clear()

    @property
    def bytes(self) -> int:
        return sum(self.sizes.values())


class SavedTensorMeter:
    """Context manager that measures activation memory saved for backward.

    Example::

        with SavedTensorMeter(exclude=model) as meter:
            loss = model(x).sum()
        print(meter.mib)
    """

    def __init__(self, exclude: nn.Module | Iterable[torch.Tensor] = ()) -> None:
        tensors = list(exclude.parameters()) + list(exclude.buffers()) if isinstance(exclude, nn.Module) else exclude
        self._count = StorageCount(tensors)
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self._count.add(t)
        return t

    @staticmethod
    def _unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    @property
    def bytes(self) -> int:
        return self._count.bytes

    @property
    def mib(self) -> float:
        return self.bytes / MiB

    @property
    def num_storages(self) -> int:
        return len(self._count.sizes)

    @property
    def keys(self) -> set[StorageKey]:
        """The identities of the storages counted (:func:`storage_key`)."""
        return set(self._count.sizes)

    def __enter__(self) -> SavedTensorMeter:
        self._count.clear()
        self._hooks.__enter__()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._hooks.__exit__(exc_type, exc, tb)


@dataclass
class _Record:
    nbytes: int
    kind: str
    born: int
    died: int | None = None


class StorageTracker(TorchDispatchMode):
    """Counts the bytes of live storages: those given to :meth:`add` and every one an op's output holds.

    ``current`` and ``peak`` are bytes; :meth:`at_peak` splits the peak by kind (see :data:`KINDS`). Storages are
    told apart by identity (:class:`StorageCount`), so views and in-place results are counted once.

    ``scratch``, a function of an op, its arguments, keyword arguments and outputs, gives the bytes its kernel holds
    inside itself beside the outputs (a model of a device's kernels: no tensor shows them); they count as kind
    "scratch" for the moment the op runs.
    """

    def __init__(self, scratch: Callable[[Any, tuple, dict, Any], int] | None = None) -> None:
        super().__init__()
        self.scratch = scratch
        self.current = 0
        self.peak = 0
        self._events = 0
        self._peak_event = 0
        self._count = StorageCount()  # the live storages
        self._records: list[_Record] = []
        self._live: dict[StorageKey, int] = {}  # storage key -> index in _records
        # weak references whose callbacks free the counts; a plain weakref costs a tenth of a weakref.finalize
        self._refs: dict[StorageKey, weakref.ref] = {}

    def add(self, tensors: Iterable[Any], kind: str = "transient") -> None:
        """Count the storages of ``tensors`` (non-tensors are ignored) as ``kind`` from now on, if not yet counted."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._track(t, kind)

    def relabel(self, tensors: Iterable[Any], kind: str) -> None:
        """Mark the live storages of ``tensors`` as ``kind`` (e.g. the gradients autograd made)."""
        self.relabel_keys((storage_key(t) for t in tensors if isinstance(t, torch.Tensor)), kind)

    def relabel_keys(self, keys: Iterable[StorageKey], kind: str) -> None:
        for key in keys:
            if key in self._live:
                self._records[self._live[key]].kind = kind

    def saved_meter(self, exclude: nn.Module | Iterable[torch.Tensor] = ()) -> SavedTensorMeter:
        """A :class:`SavedTensorMeter` that, when its block ends, marks what it counted as saved activations here."""
        return _LabellingMeter(self, exclude)

    def _track(self, t: torch.Tensor, kind: str) -> None:
        key = self._count.add(t)
        if key is None:
            return
        storage = t.untyped_storage()
        nbytes = self._count.sizes[key]
        self._events += 1
        self._live[key] = len(self._records)
        self._records.append(_Record(nbytes, kind, self._events))
        self._refs[key] = weakref.ref(storage, lambda _, key=key: self._free(key))
        self.current += nbytes
        if self.current > self.peak:
            self.peak = self.current
            self._peak_event = self._events

    def _free(self, key: StorageKey) -> None:
        self._refs.pop(key, None)
        index = self._live.pop(key, None)
        if index is None:
            return
        self._count.remove(key)
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
        if self.scratch is not None:
            self._moment(self.scratch(func, args, kwargs or {}, out))
        return out

    def _moment(self, nbytes: int) -> None:
        """A kernel's scratch: live beside everything now, freed before the next op."""
        if nbytes <= 0:
            return
        self._events += 1
        self._records.append(_Record(nbytes, "scratch", self._events, self._events + 1))
        if self.current + nbytes > self.peak:
            self.peak = self.current + nbytes
            self._peak_event = self._events
        self._events += 1

    def close(self) -> None:
        """Stop following storages (the counts stay as they are)."""
        self._refs.clear()  # a dropped weak reference calls nothing


class _LabellingMeter(SavedTensorMeter):
    def __init__(self, tracker: StorageTracker, exclude: nn.Module | Iterable[torch.Tensor]) -> None:
        super().__init__(exclude)
        self._tracker = tracker

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        super().__exit__(exc_type, exc, tb)
        self._tracker.relabel_keys(self.keys, "saved_activations")


def saved_activation_bytes(model: nn.Module, *inputs: torch.Tensor) -> int:
    """Bytes saved for backward by one forward pass of ``model`` on ``inputs`` (the model's current mode)."""
    with torch.enable_grad(), SavedTensorMeter(exclude=model) as meter:
        model(*inputs)
    return meter.bytes


def cuda_peak_bytes(step: Callable[[], object], device: torch.device | str | None = None) -> int:
    """Peak CUDA memory allocated while ``step()`` runs, above what was allocated before it."""
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def cpu_peak_bytes(step: Callable[[], object]) -> int:
    """Peak CPU memory allocated while ``step()`` runs, above what was allocated before it: the allocator's own
    allocation and free events, as ``torch.profiler`` records them with ``profile_memory=True``, summed in order. It
    sees what kernels allocate inside themselves (BatchNorm's and oneDNN convolution's scratch), which no count of
    tensors does."""
    from torch.profiler import ProfilerActivity, profile  # the profiler is loaded only where a peak is measured

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
                    and e.device_type() == torch.autograd.DeviceType.CPU)
    current = peak = 0
    for _, size in events:
        current += size
        peak = max(peak, current)
    return peak


def activation_floor_bytes(model: nn.Module, *inputs: torch.Tensor) -> int:
    """Least activation memory a DenseNet needs without recomputing across layers.

    The input image, each block's input (the stem's and transitions' outputs) and every dense layer's new
    features, each kept once: what must stay resident when everything else is rebuilt during backward.
    """
    sizes = [sum(t.numel() * t.element_size() for t in inputs)]
    block_inputs: dict[int, torch.Tensor] = {}  # held, so that no id is reused for another block's input

    def layer_output(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        sizes.append(output.numel() * output.element_size())

    def block_input(module: nn.Module, args: tuple) -> None:
        first = args[0][0]  # every layer of a block reads the block's input first
        block_inputs[id(first)] = first

    layers = [m for m in model.modules() if isinstance(m, DenseLayer)]
    handles = [m.register_forward_hook(layer_output) for m in layers]
    handles += [m.register_forward_pre_hook(block_input) for m in layers]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return sum(sizes) + sum(t.numel() * t.element_size() for t in block_inputs.values())
