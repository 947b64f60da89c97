"""The one training step of the tools, and what it runs with: its batch, autocast, the clock, threads, device memory.

A step is zero_grad, the forward under autocast with the cross-entropy loss in fp32, backward, and the optimizer's
update when one is given. bench times it without an update (so every timed step sees the same weights), the planner
counts its memory storage by storage, gradcheck runs it in every mode side by side, and gpu-report measures it.
"""
from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..choices import AMP_NAMES
from ..modelspec import ModelSpec

__all__ = ["AMP_DTYPES", "CHANNELS_LAST", "Step", "Timer", "autocast", "step_loss", "training_step", "input_shape",
           "make_batch", "torch_threads", "release"]

AMP_DTYPES = dict(zip(AMP_NAMES, (torch.bfloat16, torch.float16), strict=True))
# The channels-last memory format of each spatial dims (a model's and its input's); a signal (N, C, L) has none.
CHANNELS_LAST = {2: torch.channels_last, 3: torch.channels_last_3d}


def autocast(device: torch.device, amp: str | torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``amp`` (a name of :data:`AMP_DTYPES` or a dtype) on ``device``'s type, or nothing for
    fp32 (``amp`` None)."""
    return torch.autocast(device.type, dtype=AMP_DTYPES.get(amp, amp)) if amp else contextlib.nullcontext()


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


@dataclass
class Step:
    """What a step leaves: with ``keep``, the (detached) output and loss; with a ``timer``, its two halves in ms."""

    output: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    forward_ms: float | None = None
    backward_ms: float | None = None


def _forward(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             amp: str | torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    with autocast(x.device, amp):
        out = model(x)
    if out.dim() > 2 and y.dim() == 1:  # a segmentation model's logits: each sample's label at all its positions
        y = y.view(-1, *[1] * (out.dim() - 2)).expand(out.shape[:1] + out.shape[2:]).contiguous()
    return out, F.cross_entropy(out.float(), y)


def step_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, amp: str | torch.dtype | None = None
              ) -> torch.Tensor:
    """The step's forward half: cross-entropy of ``model(x)`` against ``y``, the forward under autocast, the loss in
    fp32 (what the meters count: everything the backward will use)."""
    return _forward(model, x, y, amp)[1]


def training_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, amp: str | torch.dtype | None = None, *,
                  optimizer: torch.optim.Optimizer | None = None, shards: int = 1,
                  meter: contextlib.AbstractContextManager | None = None, keep: bool = False,
                  timer: Timer | None = None) -> Step:
    """The one training step: zero_grad, :func:`step_loss`, backward, and ``optimizer.step()`` if given.

    ``shards``: the loss is divided by it before backward (one rank's shard of a batch split ``shards`` ways, whose
    gradients add up to the whole batch's). ``meter`` is entered around the forward half. ``keep`` returns the
    output and loss (otherwise both are freed before backward and the update, as a training loop frees them);
    ``timer`` times the forward and backward halves."""
    model.zero_grad(set_to_none=True)
    if timer is not None:
        timer.sync()
        start = timer.mark()
    with meter if meter is not None else contextlib.nullcontext():
        out, loss = _forward(model, x, y, amp)
    if timer is not None:
        middle = timer.mark()
    result = Step(out.detach(), loss.detach()) if keep else Step()
    del out
    (loss / shards if shards != 1 else loss).backward()
    del loss
    if timer is not None:
        end = timer.mark()
        timer.sync()
        result.forward_ms, result.backward_ms = timer.elapsed_ms(start, middle), timer.elapsed_ms(middle, end)
    if optimizer is not None:
        optimizer.step()
    return result


def input_shape(spec: ModelSpec, batch_size: int, img_size: int | Sequence[int]) -> tuple[int, ...]:
    """(N, C, *spatial) of a batch for ``spec``: an image, a volume or a signal of side ``img_size``, or of the
    spatial size ``img_size`` when it is a sequence (``(360, 480)``)."""
    size = (img_size,) * spec.arg("spatial_dims") if isinstance(img_size, int) else tuple(img_size)
    return (batch_size, spec.arg("in_chans"), *size)


def make_batch(spec: ModelSpec, batch_size: int, img_size: int | Sequence[int], device: torch.device,
               channels_last: bool = False, seed: int = 1,
               dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A random batch for ``spec`` (inputs of ``dtype``, default torch's, and labels) from ``seed``, on ``device``."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(input_shape(spec, batch_size, img_size), generator=generator, dtype=dtype)
    y = torch.randint(0, max(spec.arg("num_classes"), 1), (batch_size,), generator=generator)
    x = x.to(device)
    if channels_last:
        x = x.contiguous(memory_format=CHANNELS_LAST[x.dim() - 2])
    return x, y.to(device)


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


def release(device: torch.device) -> None:
    """Return a failed or finished model's GPU memory to the device (a full gc is too slow to run per probe on the
    CPU, where nothing needs returning)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
