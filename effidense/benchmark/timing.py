"""Timing in rounds: every variant takes one step in turn, so that drift of a shared machine weighs on all alike."""
from __future__ import annotations

import statistics
import traceback

import torch

from ..failures import short_error
from ..harness.step import Timer, make_batch, training_step
from ..harness.variants import COMPILE_SUFFIX
from ..progress import Progress
from .config import BenchConfig, VariantResult

__all__ = ["StepRunner", "run_batch", "time_in_rounds", "failed_result"]


class StepRunner:
    """Training steps (:func:`effidense.harness.step.training_step`) of one model on one batch (and the tiny host
    batch), with the run's autocast."""

    def __init__(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, amp: str | None,
                 host_batch: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        self.model, self.x, self.y, self.amp = model, x, y, amp
        self.host_batch = host_batch  # the tiny batch of the host-overhead step

    def step(self, x: torch.Tensor | None = None, y: torch.Tensor | None = None) -> None:
        training_step(self.model, self.x if x is None else x, self.y if y is None else y, self.amp)

    def timed_step(self, timer: Timer) -> tuple[float, float]:
        """(forward ms, backward ms) of one step."""
        step = training_step(self.model, self.x, self.y, self.amp, timer=timer)
        return step.forward_ms, step.backward_ms

    def timed_host_step(self, timer: Timer) -> float:
        """Milliseconds of one step on the tiny host batch, where arithmetic costs almost nothing: what is left is
        the framework's and the model's Python/dispatch/launch overhead."""
        if self.host_batch is None:
            raise RuntimeError("this runner has no host batch")
        step = training_step(self.model, *self.host_batch, self.amp, timer=timer)
        return step.forward_ms + step.backward_ms


def run_batch(cfg: BenchConfig, device: torch.device, rank: int, batch_size: int | None = None,
              img_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The run's batch for ``rank`` (or one of ``batch_size`` images of ``img_size``), on ``device``."""
    return make_batch(cfg.spec, batch_size or cfg.batch_size, img_size or cfg.img_size, device, cfg.channels_last,
                      cfg.seed + 1 + rank)


def time_in_rounds(cfg: BenchConfig, device: torch.device, results: dict[str, VariantResult],
                    trainers: dict[str, StepRunner], first_step_s: dict[str, float | None],
                    progress: Progress) -> None:
    """Time ``cfg.steps`` rounds in which every variant takes its turn, so that a machine slowing down or speeding up
    during the run weighs on all variants alike (and ratios can be taken round by round). A turn is one full-size
    step (unless ``cfg.host_only``), then one host-overhead step on the tiny host batch."""
    timer = Timer(device)
    samples: dict[str, list[tuple[float, float]]] = {v: [] for v in trainers}
    host: dict[str, list[float]] = {v: [] for v in trainers}
    for round_ in range(cfg.steps):
        for variant, trainer in list(trainers.items()):
            progress.describe(f"bench {variant}")
            try:
                if not cfg.host_only:
                    samples[variant].append(trainer.timed_step(timer))
                host[variant].append(trainer.timed_host_step(timer))
            except Exception as error:
                results[variant] = failed_result(variant, error, cfg)
                del trainers[variant]
                progress.advance(cfg.steps - round_)
                continue
            progress.advance()
    for variant in trainers:
        result = results[variant]
        result.samples = {"host_ms": host[variant]}
        result.host_ms = statistics.median(host[variant])
        first_ms = result.host_ms if cfg.host_only else None
        if not cfg.host_only:
            forward, backward = ([s[i] for s in samples[variant]] for i in (0, 1))
            steps = [f + b for f, b in zip(forward, backward, strict=True)]
            result.samples.update(forward_ms=forward, backward_ms=backward, step_ms=steps)
            result.forward_ms = statistics.median(forward)
            result.backward_ms = statistics.median(backward)
            result.step_ms = first_ms = statistics.median(steps)
            result.ratio_b_f = result.backward_ms / result.forward_ms if result.forward_ms else None
            result.images_per_s = cfg.batch_size / (result.step_ms / 1000.0) if result.step_ms else None
        if first_step_s[variant] is not None and variant.endswith(COMPILE_SUFFIX):
            # The first step ran at the size the rounds time (the host batch with --host-only).
            result.compile_s = max(first_step_s[variant] - first_ms / 1000.0, 0.0)


def failed_result(variant: str, error: BaseException, cfg: BenchConfig) -> VariantResult:
    if cfg.traceback:
        traceback.print_exc()
    return VariantResult(variant, status="failed", error=short_error(error, kind=True))
