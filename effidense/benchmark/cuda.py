"""GPU memory: telling out-of-memory from other errors, and the largest batch that trains without running out."""
from __future__ import annotations

import gc
from collections.abc import Callable

import torch

from ..errors import is_oom
from ..progress import Progress
from .config import CHANNELS_LAST
from .trainer import StepRunner

__all__ = ["is_oom", "bisect_fits", "largest_batch", "release", "cuda_fits", "device_for_rank"]


def bisect_fits(fits: Callable[[int], bool], good: int, bad: int) -> int:
    """The largest ``n`` in ``[good, bad)`` for which ``fits`` is true, given that ``good`` fits (or is a floor that
    needs no probe) and ``bad`` does not, ``fits`` being monotone."""
    while bad - good > 1:
        probe = (good + bad) // 2
        if fits(probe):
            good = probe
        else:
            bad = probe
    return good


def largest_batch(fits: Callable[[int], bool], start: int, limit: int) -> int:
    """Largest batch in [1, limit] for which ``fits`` is true, assuming it is monotone; 0 if none fits.

    Doubles from ``start`` until a batch fails (or ``limit``), then bisects between the last success and the first
    failure: about 2 * log2(answer / start) probes.
    """
    if start < 1 or limit < start:
        raise ValueError(f"need 1 <= start <= limit, got start={start}, limit={limit}")
    if fits(start):
        good, bad = start, None
        while bad is None:
            if good == limit:
                return good
            probe = min(good * 2, limit)
            if fits(probe):
                good = probe
            else:
                bad = probe
    else:
        good, bad = 0, start
    return bisect_fits(fits, good, bad)


def release(device: torch.device) -> None:
    """Return a failed or finished model's GPU memory to the device (a full gc is too slow to run per probe on the
    CPU, where nothing needs returning)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


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
