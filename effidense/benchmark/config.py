"""What a benchmark run measures (:class:`BenchConfig`) and what it finds (:class:`VariantResult`,
:class:`BenchReport`, which fills in every ratio to the reference variants)."""
from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..choices import COMPILE_MODES, COMPILE_SUFFIX
from ..harness.segmentation import SegmentationSpec
from ..harness.step import AMP_DTYPES, CHANNELS_LAST, input_shape
from ..modelspec import ModelSpec, dims_of_size

__all__ = ["COMPILE_MODES", "JSON_SCHEMA", "HOST_REFERENCE", "HOST_BATCH", "BenchConfig", "VariantResult",
           "BenchReport", "host_img_size", "size_label"]


# tv-plain, keeping everything, is the reference for host overhead (the framework's own cost of a step, before any
# arithmetic).
HOST_REFERENCE = "tv-plain"
HOST_BATCH = 2  # images per host-overhead step: BatchNorm needs two values per channel
JSON_SCHEMA = "effidense.bench/1"


@dataclass
class BenchConfig:
    """Everything a benchmark run measures; the same on every DDP rank.

    ``spec`` describes the model (its input, classes and name); the variants are its memory modes and the peers
    that build it, or, with ``builders``, the models that mapping builds by variant name (it must offer ``plain``,
    which every variant is checked against): an FC-DenseNet's modes and its reference port, say, which no DenseNet
    peer builds. ``img_size`` is an edge (a square, a cube or a length, as the model's spatial dims say) or the
    input's spatial size.
    """

    spec: ModelSpec | SegmentationSpec
    variants: list[str]
    batch_size: int = 8
    img_size: int | tuple[int, ...] = 32
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
    host_only: bool = False  # time only the host-overhead step (tiny input), not the full-size step or its memory
    compile_mode: str | None = None  # torch.compile's mode for "+compile" variants; None: its default
    builders: Mapping[str, Callable[[], nn.Module]] | None = None

    def __post_init__(self) -> None:
        for name in ("batch_size", "steps", "max_batch_limit"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not isinstance(self.img_size, int):
            self.img_size = tuple(self.img_size)
        size = input_shape(self.spec, 1, self.img_size)[2:]
        if min(size) < 1:
            raise ValueError(f"img_size must be at least 1, got {self.img_size}")
        dims_of_size(size, self.spec.arg("spatial_dims"), True, f"img_size {list(size)}")  # the spec's dims stand
        if self.builders is not None and "plain" not in self.builders:
            raise ValueError("builders must offer 'plain': every variant is checked against its output")
        if self.warmup < 0:
            raise ValueError(f"warmup must be non-negative, got {self.warmup}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.amp is not None and self.amp not in AMP_DTYPES:
            raise ValueError(f"amp must be one of {', '.join(AMP_DTYPES)} or None, got {self.amp!r}")
        if self.compile_mode is not None and self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got {self.compile_mode!r}")
        problem = self.spec.size_problem(self.batch_size, size)
        if problem:
            raise ValueError(problem)
        if self.channels_last and self.spec.arg("spatial_dims") not in CHANNELS_LAST:
            raise ValueError(f"--channels-last: a {self.spec.arg('spatial_dims')}D input (a signal) has no "
                             "channels-last memory format")
        if self.max_batch and self.host_only:
            raise ValueError("--host-only times the tiny host-overhead step alone; drop --max-batch")
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
    host_ms: float | None = None  # one training step at a tiny input (see host_img_size): the host's cost
    same_function_rel_diff: float | None = None
    samples: dict[str, list[float]] = field(default_factory=dict)
    # Filled in by BenchReport: relative to 'plain', and host time relative to BenchReport.host_reference.
    step_vs_plain: float | None = None
    vs_eager: float | None = None  # a compiled variant's step (host step with host_only) over its eager self's
    host_vs_ref: float | None = None
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
    host_reference: str | None = None  # the variant host ratios are taken against (set here)

    def __post_init__(self) -> None:
        ok = {r.variant: r for r in self.results if r.ok}
        # Host overhead against torchvision's plain DenseNet where it ran, else against our plain model.
        self.host_reference = next((v for v in (HOST_REFERENCE, "plain") if v in ok and ok[v].host_ms), None)
        if self.host_reference is not None:
            reference = ok[self.host_reference]
            for r in ok.values():
                r.host_vs_ref = _paired_ratio(r.samples.get("host_ms"), reference.samples.get("host_ms"))
                if r.host_vs_ref is None:
                    r.host_vs_ref = ratio(r.host_ms, reference.host_ms)
        key = "host_ms" if self.config.host_only else "step_ms"
        for r in ok.values():
            eager = ok.get(r.variant.removesuffix(COMPILE_SUFFIX))
            if r.variant.endswith(COMPILE_SUFFIX) and eager is not None:
                r.vs_eager = _paired_ratio(r.samples.get(key), eager.samples.get(key))
                if r.vs_eager is None:
                    r.vs_eager = ratio(getattr(r, key), getattr(eager, key))
        plain = ok.get("plain")
        if plain is None:
            return
        for r in self.results:
            if not r.ok:
                continue
            r.step_vs_plain = _paired_ratio(r.samples.get("step_ms"), plain.samples.get("step_ms"))
            if r.step_vs_plain is None:
                r.step_vs_plain = ratio(r.step_ms, plain.step_ms)
            r.activation_x_less = ratio(plain.activation_bytes, r.activation_bytes)
            r.peak_x_less = ratio(plain.peak_bytes, r.peak_bytes)
            r.max_batch_x = ratio(r.max_batch, plain.max_batch)

    @property
    def any_ok(self) -> bool:
        return any(r.ok for r in self.results)


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, or None when either is missing (or ``b`` is 0)."""
    return a / b if a is not None and b else None


def host_img_size(spec: ModelSpec | SegmentationSpec) -> int:
    """Image size of the host-overhead step: 32, or the model's ``min_input_size`` if larger."""
    with torch.device("meta"):  # building on the meta device costs no memory
        return max(32, spec.build("plain").min_input_size)


def size_label(spec: ModelSpec | SegmentationSpec, img_size: int | Sequence[int]) -> str:
    """``224x224``, ``96x96x96``, ``360x480``: the input's spatial size."""
    return "x".join(map(str, input_shape(spec, 1, img_size)[2:]))


def _paired_ratio(a: Sequence[float] | None, b: Sequence[float] | None) -> float | None:
    """Median over rounds of ``a[i] / b[i]`` (steps timed in the same round), or None without paired samples."""
    if not a or not b or len(a) != len(b) or not all(b):
        return None
    return statistics.median(x / y for x, y in zip(a, b, strict=True))
