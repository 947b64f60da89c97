"""Timing in rounds: every variant takes one step in turn, so that drift of a shared machine weighs on all alike."""
from __future__ import annotations

import statistics
import traceback

import torch

from .config import BenchConfig, VariantResult
from .cuda import is_oom
from .trainer import _Progress, _Timer, _Trainer
from .variants import COMPILE_SUFFIX


def _time_in_rounds(cfg: BenchConfig, device: torch.device, results: dict[str, VariantResult],
                    trainers: dict[str, _Trainer], first_step_s: dict[str, float | None],
                    progress: _Progress) -> None:
    """Time ``cfg.steps`` rounds in which every variant takes one step in turn, so that a machine slowing down or
    speeding up during the run weighs on all variants alike (and ratios can be taken round by round)."""
    timer = _Timer(device)
    samples: dict[str, list[tuple[float, float]]] = {v: [] for v in trainers}
    for _ in range(cfg.steps):
        for variant, trainer in list(trainers.items()):
            progress.variant(variant)
            try:
                samples[variant].append(trainer.timed_step(timer))
            except Exception as error:
                results[variant] = _failed(variant, error, cfg)
                del trainers[variant]
                progress.advance(cfg.steps - len(samples[variant]))
                continue
            progress.advance()
    for variant in trainers:
        result = results[variant]
        forward, backward = ([s[i] for s in samples[variant]] for i in (0, 1))
        steps = [f + b for f, b in zip(forward, backward, strict=True)]
        result.samples = {"forward_ms": forward, "backward_ms": backward, "step_ms": steps}
        result.forward_ms = statistics.median(forward)
        result.backward_ms = statistics.median(backward)
        result.step_ms = statistics.median(steps)
        result.ratio_b_f = result.backward_ms / result.forward_ms if result.forward_ms else None
        result.images_per_s = cfg.batch_size / (result.step_ms / 1000.0) if result.step_ms else None
        if first_step_s[variant] is not None and variant.endswith(COMPILE_SUFFIX):
            result.compile_s = max(first_step_s[variant] - result.step_ms / 1000.0, 0.0)


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    kind = "out of memory" if is_oom(error) else type(error).__name__
    return f"{kind}: {text[0] if text else ''}".rstrip(": ")


def _failed(variant: str, error: BaseException, cfg: BenchConfig) -> VariantResult:
    if cfg.traceback:
        traceback.print_exc()
    return VariantResult(variant, status="failed", error=_one_line(error))
