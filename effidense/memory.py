"""The one memory meter of effidense.

``SavedTensorMeter`` counts the bytes autograd keeps for backward while a forward pass runs: every tensor that
reaches ``save_for_backward`` (directly or through a non-reentrant checkpoint's saved inputs), deduplicated by
storage, with the model's parameters and buffers left out. The count is deterministic and device-independent,
so tests can assert on it. A step's peak is the allocator's: ``cuda_peak_bytes`` on a GPU, ``cpu_peak_bytes`` on
the CPU.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from types import TracebackType

import torch
from torch import nn

from .densenet import DenseLayer

MiB = 1024 * 1024


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    # The storage's identity (its StorageImpl), not its data pointer: fake tensors (effidense.footprint) all have a
    # data pointer of 0, and reading it is deprecated for them.
    return str(t.device), t.untyped_storage()._cdata


class SavedTensorMeter:
    """Context manager that measures activation memory saved for backward.

    Example::

        with SavedTensorMeter(exclude=model) as meter:
            loss = model(x).sum()
        print(meter.mib)
    """

    def __init__(self, exclude: nn.Module | Iterable[torch.Tensor] = ()) -> None:
        tensors = list(exclude.parameters()) + list(exclude.buffers()) if isinstance(exclude, nn.Module) else exclude
        self._excluded = {_storage_key(t) for t in tensors}
        self._storages: dict[tuple[str, int], int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in self._excluded:
            self._storages[key] = t.untyped_storage().nbytes()
        return t

    @staticmethod
    def _unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    @property
    def bytes(self) -> int:
        return sum(self._storages.values())

    @property
    def mib(self) -> float:
        return self.bytes / MiB

    @property
    def num_storages(self) -> int:
        return len(self._storages)

    @property
    def keys(self) -> set[int]:
        """The identities of the storages counted."""
        return {key for _, key in self._storages}

    def __enter__(self) -> SavedTensorMeter:
        self._storages.clear()
        self._hooks.__enter__()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._hooks.__exit__(exc_type, exc, tb)


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
