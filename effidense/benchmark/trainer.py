"""The one training step of the tools, timed: the building block of every measurement (bench and gpu-report)."""
from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..modelspec import ModelSpec
from .config import CHANNELS_LAST, BenchConfig, autocast
from .variants import input_shape

__all__ = ["Timer", "StepRunner", "step_loss", "training_step", "timed_step", "make_batch", "run_batch",
           "torch_threads"]


class Timer:
    """Wall-clock marks: perf_counter on the CPU, CUDA events on a GPU (so queued kernels are counted)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def elapsed_ms(self, start: Any, end: Any) -> float:
        if self.cuda:
            return start.elapsed_time(end)
        return (end - start) * 1000.0


# --- the one training step of the tools (bench and gpu-report): zero_grad, forward under autocast, loss, backward;
# no optimizer update, so every timed step sees the same weights ---

def step_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, amp: str | None) -> torch.Tensor:
    """Cross-entropy of ``model(x)`` against ``y``, the forward under the run's autocast, the loss in fp32."""
    with autocast(x.device, amp):
        out = model(x)
    return F.cross_entropy(out.float(), y)


def training_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, amp: str | None) -> None:
    """One training step without the optimizer update: zero_grad, forward, loss, backward."""
    model.zero_grad(set_to_none=True)
    step_loss(model, x, y, amp).backward()


def timed_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, amp: str | None,
               timer: Timer | None = None) -> tuple[float, float]:
    """:func:`training_step`, timed: (forward ms, backward ms)."""
    timer = Timer(x.device) if timer is None else timer
    model.zero_grad(set_to_none=True)
    timer.sync()
    start = timer.mark()
    loss = step_loss(model, x, y, amp)
    middle = timer.mark()
    loss.backward()
    end = timer.mark()
    timer.sync()
    return timer.elapsed_ms(start, middle), timer.elapsed_ms(middle, end)


class StepRunner:
    """Training steps of one model on one batch (and the tiny host batch), with the run's autocast."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, amp: str | None,
                 host_batch: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        self.model, self.x, self.y, self.amp = model, x, y, amp
        self.host_batch = host_batch  # the tiny batch of the host-overhead step

    def loss(self, x: torch.Tensor | None = None, y: torch.Tensor | None = None) -> torch.Tensor:
        return step_loss(self.model, self.x if x is None else x, self.y if y is None else y, self.amp)

    def step(self, x: torch.Tensor | None = None, y: torch.Tensor | None = None) -> None:
        training_step(self.model, self.x if x is None else x, self.y if y is None else y, self.amp)

    def timed_step(self, timer: Timer) -> tuple[float, float]:
        return timed_step(self.model, self.x, self.y, self.amp, timer)

    def timed_host_step(self, timer: Timer) -> float:
        """Milliseconds of one step on the tiny host batch, where arithmetic costs almost nothing: what is left is
        the framework's and the model's Python/dispatch/launch overhead."""
        if self.host_batch is None:
            raise RuntimeError("this runner has no host batch")
        return sum(timed_step(self.model, *self.host_batch, self.amp, timer))


def make_batch(spec: ModelSpec, batch_size: int, img_size: int, device: torch.device, channels_last: bool = False,
               seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A random batch for ``spec`` (images and labels) from ``seed``, on ``device``."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(input_shape(spec, batch_size, img_size), generator=generator)
    y = torch.randint(0, max(spec.arg("num_classes"), 1), (batch_size,), generator=generator)
    x = x.to(device)
    if channels_last:
        x = x.contiguous(memory_format=CHANNELS_LAST[x.dim() - 2])
    return x, y.to(device)


def run_batch(cfg: BenchConfig, device: torch.device, rank: int, batch_size: int | None = None,
              img_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The run's batch for ``rank`` (or one of ``batch_size`` images of ``img_size``), on ``device``."""
    return make_batch(cfg.spec, batch_size or cfg.batch_size, img_size or cfg.img_size, device, cfg.channels_last,
                      cfg.seed + 1 + rank)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` torch CPU threads (None: leave as is), restoring the count afterwards."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
