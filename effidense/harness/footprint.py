"""The memory of one training step, counted storage by storage, on tensors that allocate nothing or on real ones.

:class:`StepProbe` builds a model once (under ``FakeTensorMode`` by default) with its optimizer state, and
:meth:`StepProbe.measure` runs the one training step (:func:`effidense.harness.step.training_step`) at a batch and
input size under :class:`effidense.memory.StorageTracker`, which follows every storage on real and fake tensors alike.
It returns a :class:`StepMemory`: the peak, what was live at the peak by kind, and the bytes saved for backward
counted by the meter (:class:`effidense.SavedTensorMeter`). A fake DenseNet-121 step takes about two seconds of host
time, and one at another batch size about one (:mod:`.shapes` answers most of its kernels from the first).

What kernels allocate internally without returning it (BatchNorm's backward temporary, oneDNN's reorders, cuDNN's
workspaces) no tensor shows: a ``scratch`` model adds it (:mod:`effidense.planner.scratch` has the CPU's), and
:meth:`StepProbe.allocator_peak` measures a real step by the device's allocator, which sees it. Not counted on any
device: the CUDA context, allocator rounding and fragmentation, communication buffers; :mod:`effidense.planner`
names these and adds a safety margin.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from ..choices import OPTIMIZERS
from ..memory import KINDS, SavedTensorMeter, StorageTracker, cpu_peak_bytes, cuda_peak_bytes
from .shapes import BatchFreeShapes
from .step import step_loss, training_step

__all__ = ["OPTIMIZERS", "KINDS", "StepSpec", "StepMemory", "StepProbe"]

# OPTIMIZERS: those whose state a step holds: plain SGD has none, momentum one buffer per parameter, AdamW two (and
# a step count per parameter). "none" is bench's step: no optimizer update.


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
    """A model built once, on fake tensors (``fake=True``) or real ones on ``device``, ready to measure training
    steps. ``scratch`` models what kernels allocate inside themselves (:class:`effidense.memory.StorageTracker`)."""

    def __init__(self, build: Callable[[], nn.Module], step: StepSpec, fake: bool = True,
                 scratch: Callable[..., int] | None = None, device: str | torch.device = "cpu") -> None:
        self.step_spec = step
        self.fake = fake
        self.scratch = scratch
        self.device = torch.device(device)
        if fake and self.device.type != "cpu":
            raise ValueError("fake steps run on the CPU")
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
        return self._mode if self._mode is not None else self.device

    def _batch(self, batch: int, size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        spec = self.step_spec
        x = torch.randn(batch, spec.in_chans, *size, dtype=spec.dtype)
        y = torch.randint(0, max(spec.num_classes, 1), (batch,))
        return x, y

    def _state(self) -> list[torch.Tensor]:
        if self.optimizer is None:
            return []
        return [v for s in self.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]

    def saved_bytes(self, batch: int, size: Sequence[int]) -> int:
        """The meter's count for one training forward with its loss (no backward): what bench's depth sweep plots."""
        with self._context(), torch.enable_grad():
            x, y = self._batch(batch, size)
            with SavedTensorMeter(exclude=self.model) as meter:
                loss = step_loss(self.model, x, y, self.step_spec.amp)
            del loss
            return meter.bytes

    def measure(self, batch: int, size: Sequence[int]) -> StepMemory:
        """Track one training step at ``batch`` inputs of spatial ``size``."""
        size = tuple(int(s) for s in size)
        model = self.model
        with self._context(), torch.enable_grad():
            x, y = self._batch(batch, size)
            tracker = StorageTracker(self.scratch)
            tracker.add([*model.parameters(), *model.buffers()], "parameters")
            tracker.add(self._state(), "optimizer_state")
            tracker.add((x, y), "input")
            try:
                with BatchFreeShapes() if self.fake else contextlib.nullcontext(), tracker:
                    meter = tracker.saved_meter(exclude=model)
                    training_step(model, x, y, self.step_spec.amp, optimizer=self.optimizer, meter=meter)
                    saved = meter.bytes
                    grads = [p.grad for p in model.parameters() if p.grad is not None]
                    tracker.relabel(grads, "gradients")
                    gradient_bytes = sum(g.untyped_storage().nbytes() for g in grads)
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

    def allocator_peak(self, batch: int, size: Sequence[int]) -> int:
        """The peak of one real training step by the device's allocator (its events on the CPU,
        ``max_memory_allocated`` on CUDA) plus what was allocated before it and lives through it: parameters, buffers,
        optimizer state and the batch. The referee of :meth:`measure`'s peak."""
        if self.fake:
            raise ValueError("an allocator's peak needs real tensors (fake=False)")
        model = self.model
        model.zero_grad(set_to_none=True)
        with self._context(), torch.enable_grad():
            x, y = self._batch(batch, tuple(int(s) for s in size))
            before = sum(t.untyped_storage().nbytes() for t in (*model.parameters(), *model.buffers(), *self._state(),
                                                                  x, y))

            def step() -> None:
                training_step(model, x, y, self.step_spec.amp, optimizer=self.optimizer)

            peak = cuda_peak_bytes(step, self.device) if self.device.type == "cuda" else cpu_peak_bytes(step)
            model.zero_grad(set_to_none=True)
        return before + peak
