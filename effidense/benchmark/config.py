"""What a benchmark run measures (:class:`BenchConfig`) and what it finds (:class:`VariantResult`,
:class:`BenchReport`, which fills in every ratio to the reference variants)."""
from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..modelspec import ModelSpec

__all__ = ["AMP_DTYPES", "JSON_SCHEMA", "BenchConfig", "VariantResult", "BenchReport"]


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
JSON_SCHEMA = "effidense.bench/1"


@dataclass
class BenchConfig:
    """Everything a benchmark run measures; the same on every DDP rank."""

    spec: ModelSpec
    variants: list[str]
    batch_size: int = 8
    img_size: int = 32
    device: str = "cpu"
    amp: str | None = None
    channels_last: bool = False
    warmup: int = 1
    steps: int = 3
    seed: int = 0
    max_batch: bool = False
    max_batch_limit: int = 1 << 16
    threads: int | None = None
    progress: bool = True
    traceback: bool = False  # print the full traceback of a failing variant to stderr

    def __post_init__(self) -> None:
        for name in ("batch_size", "img_size", "steps", "max_batch_limit"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be non-negative, got {self.warmup}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.amp is not None and self.amp not in AMP_DTYPES:
            raise ValueError(f"amp must be one of {', '.join(AMP_DTYPES)} or None, got {self.amp!r}")
        if self.max_batch and self.device != "cuda":
            raise ValueError("--max-batch searches GPU memory and needs --device cuda (on the CPU it would exhaust "
                             "the host's memory instead)")


@dataclass
class VariantResult:
    """One variant's numbers (times in ms, memory in bytes); ``status`` is 'ok', 'failed' or 'skipped'."""

    variant: str
    status: str = "ok"
    error: str | None = None
    forward_ms: float | None = None
    backward_ms: float | None = None
    step_ms: float | None = None
    ratio_b_f: float | None = None
    images_per_s: float | None = None
    activation_bytes: int | None = None
    peak_bytes: int | None = None
    compile_s: float | None = None
    max_batch: int | None = None
    same_function_rel_diff: float | None = None
    samples: dict[str, list[float]] = field(default_factory=dict)
    # Filled in relative to the 'plain' variant by BenchReport.
    step_vs_plain: float | None = None
    activation_x_less: float | None = None
    peak_x_less: float | None = None
    max_batch_x: float | None = None
    per_rank: list[dict[str, Any]] | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class BenchReport:
    """A finished run: the configuration, one result per variant, environment, and the depth sweep if plotted."""

    config: BenchConfig
    results: list[VariantResult]
    environment: dict[str, Any]
    world_size: int = 1
    depth_sweep: dict[str, Any] | None = None
    floor_bytes: int | None = None

    def __post_init__(self) -> None:
        plain = next((r for r in self.results if r.variant == "plain" and r.ok), None)
        if plain is None:
            return
        for r in self.results:
            if not r.ok:
                continue
            r.step_vs_plain = _paired_ratio(r.samples.get("step_ms"), plain.samples.get("step_ms"))
            if r.step_vs_plain is None:
                r.step_vs_plain = _ratio(r.step_ms, plain.step_ms)
            r.activation_x_less = _ratio(plain.activation_bytes, r.activation_bytes)
            r.peak_x_less = _ratio(plain.peak_bytes, r.peak_bytes)
            r.max_batch_x = _ratio(r.max_batch, plain.max_batch)

    @property
    def any_ok(self) -> bool:
        return any(r.ok for r in self.results)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _paired_ratio(a: Sequence[float] | None, b: Sequence[float] | None) -> float | None:
    """Median over rounds of ``a[i] / b[i]`` (steps timed in the same round), or None without paired samples."""
    if not a or not b or len(a) != len(b) or not all(b):
        return None
    return statistics.median(x / y for x, y in zip(a, b, strict=True))
