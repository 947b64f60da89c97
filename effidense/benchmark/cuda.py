"""GPU memory: the probe of the largest batch that trains without running out (only out-of-memory means "does not
fit"), and the device of each rank."""
from __future__ import annotations

from collections.abc import Callable

import torch

from ..failures import is_oom
from ..harness.step import CHANNELS_LAST, release
from ..progress import Progress
from .timing import StepRunner

__all__ = ["is_oom", "cuda_fits", "device_for_rank"]


def _probe_step(trainer: StepRunner, template: torch.Tensor, batch: int, num_classes: int,
                channels_last: bool) -> None:
    # A function of its own, so that its tensors and autograd graph die with its frame when it raises.
    x = torch.randn((batch, *template.shape[1:]), device=template.device, dtype=template.dtype)
    if channels_last:
        x = x.contiguous(memory_format=CHANNELS_LAST[x.dim() - 2])
    y = torch.randint(0, max(num_classes, 1), (batch,), device=template.device)
    trainer.step(x, y)
    torch.cuda.synchronize(template.device)


def cuda_fits(trainer: StepRunner, template: torch.Tensor, num_classes: int, channels_last: bool,
               progress: Progress) -> Callable[[int], bool]:
    """A probe for :func:`largest_batch`: does one training step at this batch size fit in GPU memory?"""

    def fits(batch: int) -> bool:
        progress.note(f"max-batch probe {batch}")
        try:
            _probe_step(trainer, template, batch, num_classes, channels_last)
            return True
        except Exception as error:  # only running out of memory means "does not fit"
            if not is_oom(error):
                raise
            return False
        finally:  # runs after the exception (and the frames it holds) is gone
            trainer.model.zero_grad(set_to_none=True)
            release(template.device)

    return fits


def device_for_rank(device: str, local_rank: int) -> torch.device:
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for but torch sees no CUDA device")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        return dev
    return torch.device("cpu")
