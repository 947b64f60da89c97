"""One training step of one model, timed: the building block of every measurement (and the progress bar)."""
from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import AMP_DTYPES, BenchConfig

__all__ = ["torch_threads"]


class _Timer:
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


class _Trainer:
    """Runs training steps of one model on one batch, with the run's autocast and memory format."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, amp: str | None,
                 host_batch: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        self.model, self.x, self.y = model, x, y
        self.amp = AMP_DTYPES[amp] if amp else None
        self.host_batch = host_batch  # the tiny batch of the host-overhead step

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.x.device.type, dtype=self.amp)

    def loss(self, x: torch.Tensor | None = None, y: torch.Tensor | None = None) -> torch.Tensor:
        with self.autocast():
            out = self.model(self.x if x is None else x)
        return F.cross_entropy(out.float(), self.y if y is None else y)

    def step(self, x: torch.Tensor | None = None, y: torch.Tensor | None = None) -> None:
        self.model.zero_grad(set_to_none=True)
        self.loss(x, y).backward()

    def timed_step(self, timer: _Timer) -> tuple[float, float]:
        self.model.zero_grad(set_to_none=True)
        timer.sync()
        start = timer.mark()
        loss = self.loss()
        middle = timer.mark()
        loss.backward()
        end = timer.mark()
        timer.sync()
        return timer.elapsed_ms(start, middle), timer.elapsed_ms(middle, end)

    def timed_host_step(self, timer: _Timer) -> float:
        """Milliseconds of one step (as :meth:`timed_step`) on the tiny host batch, where arithmetic costs almost
        nothing: what is left is the framework's and the model's Python/dispatch/launch overhead."""
        if self.host_batch is None:
            raise RuntimeError("this trainer has no host batch")
        x, y = self.host_batch
        self.model.zero_grad(set_to_none=True)
        timer.sync()
        start = timer.mark()
        self.loss(x, y).backward()
        end = timer.mark()
        timer.sync()
        return timer.elapsed_ms(start, end)


def _make_batch(cfg: BenchConfig, device: torch.device, rank: int, batch_size: int | None = None,
                img_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The run's batch for ``rank`` (or one of ``batch_size`` images of ``img_size``), on ``device``."""
    batch_size, img_size = batch_size or cfg.batch_size, img_size or cfg.img_size
    generator = torch.Generator().manual_seed(cfg.seed + 1 + rank)
    shape = (batch_size, cfg.spec.arg("in_chans"), img_size, img_size)
    x = torch.randn(shape, generator=generator)
    y = torch.randint(0, max(cfg.spec.arg("num_classes"), 1), (batch_size,), generator=generator)
    x = x.to(device)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device)


class _Progress:
    """tqdm on stderr counting steps over all variants; silent on non-zero ranks or when disabled."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="bench", unit="step", file=sys.stderr, dynamic_ncols=True)

    def variant(self, name: str) -> None:
        if self.bar is not None:
            self.bar.set_description(f"bench {name}")

    def note(self, text: str) -> None:
        """What the current variant is doing, for work that is not counted in steps (compiling, max-batch)."""
        if self.bar is not None:
            self.bar.set_postfix_str(text)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


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
