"""Side-by-side training-step benchmark of the memory modes, their compiled versions and the peers.

Every variant computes the same function: each is built fresh and loaded with one set of weights, and (before any
training) its eval-mode output is checked against the plain model's. A variant then runs warm-up steps, one step
under :class:`effidense.SavedTensorMeter` (activation memory) and on CUDA one step under
:func:`effidense.cuda_peak_bytes`. Then the variants take turns: each timed round runs one step of every variant, so
that a shared machine's drift weighs on all alike; medians are reported, and ratios to plain are medians of the
per-round ratios. A step is zero_grad, forward, cross-entropy loss and backward (no optimizer update, so every timed
step sees the same weights). ``--max-batch`` searches run last.

Variants: ``plain``, ``efficient``, ``frugal`` (our memory modes), ``tv`` (torchvision's DenseNet with
``memory_efficient=True``), ``timm`` (timm's DenseNet after ``set_grad_checkpointing()``), and any of them with a
``+compile`` suffix. The peers exist only for configurations their DenseNet classes can build exactly (ImageNet
stem, bottleneck layers, compression 0.5; timm also needs ``num_init_features == 2 * growth_rate``), so e.g.
DenseNet-121/161/169/201/264 have both, the CIFAR nets have neither, and timm's ``densenet264d`` (deep stem) is not
a counterpart of anything here.

``tools/bench.py`` is the command-line front; :func:`run_benchmark` is the per-process core (DDP ranks call it too).
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import gc
import json
import os
import platform
import socket
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .densenet import MEMORY_MODES
from .fileio import atomic_write_bytes
from .memory import MiB, SavedTensorMeter, activation_floor_bytes, cuda_peak_bytes
from .modelspec import ModelSpec

__all__ = [
    "PEERS", "COMPILE_SUFFIX", "BenchConfig", "VariantResult", "BenchReport", "parse_variants", "peer_unsupported",
    "build_variant", "compile_model", "run_benchmark", "memory_by_depth", "largest_batch", "is_oom", "environment",
    "format_table", "report_to_json", "write_plot", "free_port", "atomic_write_bytes", "AMP_DTYPES",
]

PEERS = ("tv", "timm")
COMPILE_SUFFIX = "+compile"
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
JSON_SCHEMA = "effidense.bench/1"
# Relative output difference (max |a - b| / max |plain|) above which a variant is not "the same function".
_SAME_FUNCTION_TOL = 1e-3


# --- variants ---

def parse_variants(text: str | Sequence[str], compile_all: bool = False) -> list[str]:
    """Variant names from ``"plain,efficient,tv"``; ``compile_all`` appends ``+compile`` copies of our modes."""
    names = [v.strip() for v in (text.split(",") if isinstance(text, str) else text) if v.strip()]
    known = (*MEMORY_MODES, *PEERS)
    for name in names:
        if name.removesuffix(COMPILE_SUFFIX) not in known:
            raise ValueError(f"unknown variant {name!r}; choose from {', '.join(known)}, each optionally with "
                             f"{COMPILE_SUFFIX!r}")
    if not names:
        raise ValueError("no variants given")
    if compile_all:
        names += [n + COMPILE_SUFFIX for n in names if n in MEMORY_MODES]
    return list(dict.fromkeys(names))  # drop repeats, keep order


def peer_unsupported(spec: ModelSpec, peer: str) -> str | None:
    """Why ``peer`` has no exact counterpart of ``spec`` (None when it has one)."""
    reasons = []
    if spec.arg("small_inputs"):
        reasons.append("it has no small-input (CIFAR) stem")
    if not spec.bottleneck:
        reasons.append("its dense layers always have a bottleneck")
    if spec.arg("compression") != 0.5:
        reasons.append("its transitions always keep half the channels")
    if peer == "tv":
        if spec.arg("in_chans") != 3:
            reasons.append("it takes 3 input channels only")
        if spec.arg("global_pool") != "avg":
            reasons.append("it pools by average only")
        if spec.arg("head_drop_rate"):
            reasons.append("it has no head dropout")
    elif peer == "timm" and spec.arg("num_init_features") != 2 * spec.arg("growth_rate"):
        reasons.append("its stem width is always 2 * growth_rate")
    name = {"tv": "torchvision", "timm": "timm"}[peer]
    return f"{name} cannot build {spec.name}: {'; '.join(reasons)}" if reasons else None


def build_variant(variant: str, spec: ModelSpec) -> nn.Module:
    """An uncompiled model for ``variant`` (without ``+compile``) with fresh weights."""
    if variant in MEMORY_MODES:
        return spec.build(variant)
    reason = peer_unsupported(spec, variant)
    if reason:
        raise ValueError(reason)
    if variant == "tv":
        import torchvision

        return torchvision.models.DenseNet(
            growth_rate=spec.arg("growth_rate"), block_config=spec.block_config,
            num_init_features=spec.arg("num_init_features"), bn_size=spec.arg("bn_size"),
            drop_rate=spec.arg("drop_rate"), num_classes=spec.arg("num_classes"), memory_efficient=True)
    if variant == "timm":
        from timm.models.densenet import DenseNet as TimmDenseNet

        model = TimmDenseNet(
            growth_rate=spec.arg("growth_rate"), block_config=spec.block_config, num_classes=spec.arg("num_classes"),
            in_chans=spec.arg("in_chans"), global_pool=spec.arg("global_pool"), bn_size=spec.arg("bn_size"),
            drop_rate=spec.arg("head_drop_rate"), proj_drop_rate=spec.arg("drop_rate"))
        model.set_grad_checkpointing(True)
        return model
    raise ValueError(f"unknown variant {variant!r}")


def compile_model(model: nn.Module) -> nn.Module:
    """Compiled ``model``: its own ``set_compile(True)`` when it has one (regional compile), else ``torch.compile``."""
    if hasattr(model, "set_compile"):
        model.set_compile(True)
        return model
    return torch.compile(model)


# --- configuration and results ---

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


# --- measuring ---

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

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, amp: str | None) -> None:
        self.model, self.x, self.y = model, x, y
        self.amp = AMP_DTYPES[amp] if amp else None

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


def is_oom(error: BaseException) -> bool:
    """Whether ``error`` is the GPU running out of memory (including cuDNN/cuBLAS allocation failures)."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


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
    while bad - good > 1:
        probe = (good + bad) // 2
        if fits(probe):
            good = probe
        else:
            bad = probe
    return good


def _release_cuda() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def _probe_step(trainer: _Trainer, template: torch.Tensor, batch: int, num_classes: int,
                channels_last: bool) -> None:
    # A function of its own, so that its tensors and autograd graph die with its frame when it raises.
    x = torch.randn((batch, *template.shape[1:]), device=template.device, dtype=template.dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, max(num_classes, 1), (batch,), device=template.device)
    trainer.step(x, y)
    torch.cuda.synchronize(template.device)


def _cuda_fits(trainer: _Trainer, template: torch.Tensor, num_classes: int, channels_last: bool,
               progress: _Progress) -> Callable[[int], bool]:
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
            _release_cuda()

    return fits


def _make_batch(cfg: BenchConfig, device: torch.device, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(cfg.seed + 1 + rank)
    shape = (cfg.batch_size, cfg.spec.arg("in_chans"), cfg.img_size, cfg.img_size)
    x = torch.randn(shape, generator=generator)
    y = torch.randint(0, max(cfg.spec.arg("num_classes"), 1), (cfg.batch_size,), generator=generator)
    x = x.to(device)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device)


def _check_same_function(model: nn.Module, x: torch.Tensor, reference: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        out = model(x)
    model.train()
    diff = (out.float() - reference).abs().max().item() / max(reference.abs().max().item(), 1e-12)
    if not diff <= _SAME_FUNCTION_TOL:
        raise RuntimeError(f"does not compute the plain model's function: eval output differs by {diff:.3g} "
                           f"(relative, tolerance {_SAME_FUNCTION_TOL:g})")
    return diff


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


def _device_for_rank(device: str, local_rank: int) -> torch.device:
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for but torch sees no CUDA device")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        return dev
    return torch.device("cpu")


def run_benchmark(cfg: BenchConfig, local_rank: int = 0) -> list[VariantResult]:
    """Measure every variant in ``cfg`` in this process; under DDP, every rank calls this and gets the merged results.

    A variant that raises (out of memory, no peer counterpart, a compile error) becomes a failed or skipped result;
    the others still run.
    """
    with torch_threads(cfg.threads):
        return _run_benchmark(cfg, local_rank)


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


def _run_benchmark(cfg: BenchConfig, local_rank: int) -> list[VariantResult]:
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if distributed else 0
    device = _device_for_rank(cfg.device, local_rank)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    torch.manual_seed(cfg.seed)
    base = cfg.spec.build("plain")
    state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    x, y = _make_batch(cfg, device, rank)
    probe = x[: min(2, len(x))]
    base.to(device).eval()
    if cfg.channels_last:
        base.to(memory_format=torch.channels_last)
    with torch.no_grad():
        reference = base(probe).float()
    del base

    prepare_steps = max(cfg.warmup, 1) + 1 + (device.type == "cuda")
    progress = _Progress((prepare_steps + cfg.steps) * len(cfg.variants), cfg.progress and rank == 0)
    results: dict[str, VariantResult] = {}
    trainers: dict[str, _Trainer] = {}
    first_step_s: dict[str, float | None] = {}
    try:
        for variant in cfg.variants:
            progress.variant(variant)
            before = progress.bar.n if progress.bar is not None else 0
            results[variant], trainer, first_step_s[variant] = _prepare_variant(
                variant, cfg, device, state, x, y, probe, reference, progress)
            if trainer is not None:
                trainers[variant] = trainer
            elif device.type == "cuda":  # what a variant that ran out of memory left behind
                _release_cuda()
            done = (progress.bar.n if progress.bar is not None else 0) - before
            progress.advance(prepare_steps - done + (cfg.steps if trainer is None else 0))
        _time_in_rounds(cfg, device, results, trainers, first_step_s, progress)
        if cfg.max_batch:
            for variant, trainer in trainers.items():
                progress.variant(variant)
                for other in trainers.values():  # only this variant's memory should count
                    other.model.zero_grad(set_to_none=True)
                _release_cuda()
                try:
                    fits = _cuda_fits(trainer, x, cfg.spec.arg("num_classes"), cfg.channels_last, progress)
                    results[variant].max_batch = largest_batch(fits, cfg.batch_size, cfg.max_batch_limit)
                except Exception as error:
                    results[variant] = _failed(variant, error, cfg)
                progress.note("")
    finally:
        trainers.clear()
        progress.close()
    ordered = [results[v] for v in cfg.variants]
    if distributed:
        ordered = [_merge_ranks(r, torch.distributed.get_world_size(), cfg.batch_size) for r in ordered]
    return ordered


def _failed(variant: str, error: BaseException, cfg: BenchConfig) -> VariantResult:
    if cfg.traceback:
        traceback.print_exc()
    return VariantResult(variant, status="failed", error=_one_line(error))


def _prepare_variant(variant: str, cfg: BenchConfig, device: torch.device, state: dict[str, torch.Tensor],
                     x: torch.Tensor, y: torch.Tensor, probe: torch.Tensor, reference: torch.Tensor,
                     progress: _Progress) -> tuple[VariantResult, _Trainer | None, float | None]:
    """Build, check, warm up (compile) and measure the memory of one variant; returns its result so far, the trainer
    to time it with (None if it failed or was skipped) and the duration of its first step in seconds."""
    result = VariantResult(variant)
    base_variant = variant.removesuffix(COMPILE_SUFFIX)
    compiled = variant.endswith(COMPILE_SUFFIX)
    if base_variant in PEERS:
        reason = peer_unsupported(cfg.spec, base_variant)
        if reason:
            result.status, result.error = "skipped", reason
            return result, None, None
    try:
        torch.manual_seed(cfg.seed)
        model = build_variant(base_variant, cfg.spec)
        model.load_state_dict(state)
        model.to(device).train()
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        if not compiled:  # compiling an eval graph just for this check would double the compile time
            result.same_function_rel_diff = _check_same_function(model, probe, reference)
        model = _wrap(model, compiled, device)
        trainer = _Trainer(model, x, y, cfg.amp)
        timer = _Timer(device)

        first_step_s = None
        for i in range(max(cfg.warmup, 1 if compiled else 0)):
            progress.note("compiling (first step)" if compiled and i == 0 else "warm-up")
            timer.sync()
            start = time.perf_counter()
            trainer.step()
            timer.sync()
            if i == 0:
                first_step_s = time.perf_counter() - start
            progress.advance()
        progress.note("")

        model.zero_grad(set_to_none=True)
        with SavedTensorMeter(exclude=model) as meter:
            loss = trainer.loss()
        loss.backward()  # DDP expects every forward to be followed by its backward
        del loss
        result.activation_bytes = meter.bytes
        progress.advance()

        if device.type == "cuda":
            model.zero_grad(set_to_none=True)
            result.peak_bytes = cuda_peak_bytes(lambda: trainer.loss().backward(), device)
            model.zero_grad(set_to_none=True)
            progress.advance()
        return result, trainer, first_step_s
    except Exception as error:
        return _failed(variant, error, cfg), None, None


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


def _wrap(model: nn.Module, compiled: bool, device: torch.device) -> nn.Module:
    """Compile and/or wrap in DDP. Regional compile goes inside DDP; whole-model torch.compile goes outside it."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    regional = compiled and hasattr(model, "set_compile")
    if regional:
        model = compile_model(model)
    if distributed:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if compiled and not regional:
        model = torch.compile(model)
    return model


_RANK_FIELDS = ("status", "error", "forward_ms", "backward_ms", "step_ms", "activation_bytes", "peak_bytes",
                "compile_s", "max_batch")


def _merge_ranks(result: VariantResult, world: int, batch_size: int) -> VariantResult:
    """Aggregate a variant over DDP ranks: the slowest rank's times, the largest per-rank memory, total images/s."""
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, {k: getattr(result, k) for k in _RANK_FIELDS})
    failed = [g for g in gathered if g["status"] != "ok"]
    if failed:
        merged = VariantResult(result.variant, status=failed[0]["status"], error=failed[0]["error"])
    else:
        merged = copy.copy(result)

        def worst(key: str) -> Any:
            values = [g[key] for g in gathered if g[key] is not None]
            return max(values) if values else None

        merged.forward_ms, merged.backward_ms, merged.step_ms = worst("forward_ms"), worst("backward_ms"), \
            worst("step_ms")
        merged.activation_bytes, merged.peak_bytes = worst("activation_bytes"), worst("peak_bytes")
        merged.compile_s = worst("compile_s")
        merged.ratio_b_f = merged.backward_ms / merged.forward_ms if merged.forward_ms else None
        merged.images_per_s = world * batch_size / (merged.step_ms / 1000.0) if merged.step_ms else None
    merged.per_rank = gathered
    return merged


def memory_by_depth(cfg: BenchConfig, scales: Sequence[float],
                    modes: Sequence[str] = MEMORY_MODES) -> dict[str, Any]:
    """Activation bytes (the meter) of one training forward for the model family at each depth scale.

    The family scales every block's layer count of ``cfg.spec`` by each factor in ``scales``; batch, image size,
    autocast and memory format are the run's.
    """
    device = _device_for_rank(cfg.device, 0)
    specs = {s.block_config: s for s in (cfg.spec.scaled(f) for f in scales)}
    specs_sorted = sorted(specs.values(), key=lambda s: s.depth)
    sweep: dict[str, Any] = {"depths": [s.depth for s in specs_sorted],
                             "block_configs": [list(s.block_config) for s in specs_sorted],
                             "activation_bytes": {m: [] for m in modes}}
    x, y = _make_batch(cfg, device, 0)
    errors: list[str] = []
    for spec in specs_sorted:
        for mode in modes:
            try:
                torch.manual_seed(cfg.seed)
                model = spec.build(mode).to(device).train()
                if cfg.channels_last:
                    model.to(memory_format=torch.channels_last)
                with SavedTensorMeter(exclude=model) as meter:
                    _Trainer(model, x, y, cfg.amp).loss()
                sweep["activation_bytes"][mode].append(meter.bytes)
            except Exception as error:  # e.g. the deepest plain net does not fit: keep the other points
                sweep["activation_bytes"][mode].append(None)
                errors.append(f"depth {spec.depth} {mode}: {_one_line(error)}")
            finally:
                model = None
                if device.type == "cuda":
                    _release_cuda()
    sweep["errors"] = errors
    return sweep


# --- environment and output ---

def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def environment(device: str, command: str, world_size: int = 1) -> dict[str, Any]:
    """Versions, hardware and the command, for the JSON output and the table header."""
    import timm
    import torchvision

    from . import __version__

    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "effidense": __version__,
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "world_size": world_size,
    }
    if device == "cuda" and torch.cuda.is_available():
        env.update(device_name=torch.cuda.get_device_name(0), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(), gpu_count=torch.cuda.device_count(),
                   gpu_memory_bytes=torch.cuda.get_device_properties(0).total_memory)
    else:
        env["device_name"] = env["cpu"]
    return env


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def format_table(report: BenchReport) -> str:
    """The markdown table printed on stdout, preceded by a header naming model, settings and machine."""
    cfg, env = report.config, report.environment
    cuda = cfg.device == "cuda"
    show_compile = any(r.variant.endswith(COMPILE_SUFFIX) for r in report.results)
    columns = ["variant", "forward ms", "backward ms", "R=B/F", "step ms", "step vs plain", "images/s",
               "activation MiB", "x less"]
    if cuda:
        columns += ["peak MiB", "peak x less"]
    if show_compile:
        columns += ["compile s"]
    if cfg.max_batch:
        columns += ["max batch", "max batch x"]
    rows = []
    for r in report.results:
        if not r.ok:
            rows.append([r.variant, f"{r.status.upper()}: {r.error}"] + [""] * (len(columns) - 2))
            continue
        row = [r.variant, _fmt(r.forward_ms, ".1f"), _fmt(r.backward_ms, ".1f"), _fmt(r.ratio_b_f, ".2f"),
               _fmt(r.step_ms, ".1f"), _fmt(r.step_vs_plain, ".2f", "x"), _fmt(r.images_per_s, ".1f"),
               _fmt(None if r.activation_bytes is None else r.activation_bytes / MiB, ".1f"),
               _fmt(r.activation_x_less, ".2f", "x")]
        if cuda:
            row += [_fmt(None if r.peak_bytes is None else r.peak_bytes / MiB, ".1f"),
                    _fmt(r.peak_x_less, ".2f", "x")]
        if show_compile:
            row += [_fmt(r.compile_s, ".1f")]
        if cfg.max_batch:
            row += [_fmt(r.max_batch, "d"), _fmt(r.max_batch_x, ".2f", "x")]
        rows.append(row)
    # A failed row's message spans the table, so it does not set the width of the forward-time column.
    widths = [max([len(c)] + [len(row[i]) for row, r in zip(rows, report.results, strict=True)
                              if r.ok or i == 0]) for i, c in enumerate(columns)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) + " |" for row in rows]
    per_rank = f" per rank, {report.world_size} DDP ranks (images/s is their total)" if report.world_size > 1 else ""
    header = [
        f"model: {cfg.spec.describe()}",
        f"batch {cfg.batch_size}{per_rank}, {cfg.img_size}x{cfg.img_size}, {cfg.amp or 'fp32'}"
        f"{', channels_last' if cfg.channels_last else ''}, {cfg.device} ({env.get('device_name')}), "
        f"median of {cfg.steps} round{'s' if cfg.steps != 1 else ''} after {cfg.warmup} warm-up",
        f"torch {env['torch']}, {env['cpu_count']} CPUs, {env['torch_threads']} threads, {env['date']}",
        "",
    ]
    notes = ["", "Variants take turns: each round times one step of every variant. x less: plain's activation (peak) "
             "memory divided by the variant's; step vs plain: median over rounds of the variant's step time divided by "
             "plain's in the same round; a step is forward + loss + backward."]
    if report.floor_bytes:
        plain = next((r for r in report.results if r.variant == "plain" and r.ok), None)
        versus = f", {plain.activation_bytes / report.floor_bytes:.1f}x less than plain" if plain else ""
        notes.append(f"floor: {report.floor_bytes / MiB:.1f} MiB (fp32 input + block inputs + every dense layer's new "
                     f"features, each kept once: the least without recomputing across layers{versus})")
    return "\n".join(header + lines + notes)


def report_to_json(report: BenchReport) -> dict[str, Any]:
    """Every number of the run and its environment, JSON-serialisable."""
    cfg = report.config
    config = {k: v for k, v in asdict(cfg).items() if k not in ("spec", "progress", "traceback")}
    config["model"] = {"name": cfg.spec.name, "depth": cfg.spec.depth,
                       "kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.spec.kwargs.items()}}
    return {
        "schema": JSON_SCHEMA,
        "environment": report.environment,
        "config": config,
        "world_size": report.world_size,
        "results": [{k: v for k, v in asdict(r).items()} for r in report.results],
        "depth_sweep": report.depth_sweep,
        "floor_bytes": report.floor_bytes,
    }


def write_json(path: str, report: BenchReport) -> None:
    atomic_write_bytes(path, (json.dumps(report_to_json(report), indent=2) + "\n").encode())


def write_plot(path: str, report: BenchReport) -> None:
    """PNG: activation memory against depth per memory mode (left) and forward/backward time per variant (right)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = report.config
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.2))
    sweep = report.depth_sweep
    if sweep:
        styles = {"plain": ("tab:red", "o"), "efficient": ("tab:blue", "s"), "frugal": ("tab:green", "^")}
        for mode, values in sweep["activation_bytes"].items():
            color, marker = styles.get(mode, (None, "x"))
            points = [(d, v / MiB) for d, v in zip(sweep["depths"], values, strict=True) if v is not None]
            left.plot([d for d, _ in points], [v for _, v in points], marker=marker, color=color, label=mode)
        plain = sweep["activation_bytes"].get("plain")
        for mode, values in sweep["activation_bytes"].items():
            if plain and plain[-1] and mode != "plain" and values[-1]:
                left.annotate(f"{plain[-1] / values[-1]:.1f}x less", (sweep["depths"][-1], values[-1] / MiB),
                              textcoords="offset points", xytext=(-6, 6), ha="right", fontsize=8)
        left.set_xlabel("depth (layers)")
        left.set_ylabel("activation memory saved for backward (MiB)")
        left.set_title(f"Activation memory vs depth\n{_family_name(cfg.spec)}, batch {cfg.batch_size}, "
                       f"{cfg.img_size}x{cfg.img_size}, {cfg.amp or 'fp32'}")
        left.grid(True, alpha=0.3)
        left.legend()
    else:
        left.set_axis_off()
    ok = [r for r in report.results if r.ok]
    names = [r.variant for r in ok]
    forward = [r.forward_ms for r in ok]
    backward = [r.backward_ms for r in ok]
    positions = range(len(ok))
    right.bar(positions, forward, color="tab:gray", label="forward")
    right.bar(positions, backward, bottom=forward, color="tab:orange", label="backward")
    for i, r in enumerate(ok):  # the label is the median step, which need not equal median forward + median backward
        right.text(i, r.forward_ms + r.backward_ms, f"step {r.step_ms:.0f} ms", ha="center", va="bottom", fontsize=8)
    right.set_xticks(list(positions), names, rotation=30, ha="right")
    right.set_ylabel("median training step (ms)")
    if ok:
        right.set_ylim(top=1.12 * max(r.forward_ms + r.backward_ms for r in ok))
    right.set_title(f"Step time, {cfg.spec.name}, batch {cfg.batch_size}, {cfg.img_size}x{cfg.img_size}\n"
                    f"{report.environment.get('device_name')}, torch {report.environment['torch']}")
    right.grid(True, axis="y", alpha=0.3)
    right.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def _family_name(spec: ModelSpec) -> str:
    kind = "DenseNet-BC" if spec.bottleneck else "DenseNet"
    return f"{kind} k={spec.arg('growth_rate')}, {len(spec.block_config)} blocks"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a process group's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def process_group(backend: str, rank: int, world_size: int, init_method: str) -> Iterator[None]:
    """An initialised default process group for the duration of the block."""
    torch.distributed.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def torchrun_world() -> tuple[int, int, int] | None:
    """(rank, local_rank, world_size) when this process was started by torchrun with more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or "RANK" not in os.environ:
        return None
    return int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"])), world


def backend_for(device: str) -> str:
    """nccl between GPUs, gloo between CPU processes."""
    return "nccl" if device == "cuda" else "gloo"


def check_world(device: str, world: int) -> None:
    """Raise ValueError when ``world`` processes cannot each get their own ``device``."""
    if world < 1:
        raise ValueError(f"the number of processes must be at least 1, got {world}")
    if device == "cuda" and world > 1 and torch.cuda.device_count() < world:
        raise ValueError(f"{world} processes need {world} GPUs, torch sees {torch.cuda.device_count()}")


def _bench_worker(rank: int, world: int, cfg: BenchConfig, init_method: str, result_path: str) -> None:
    if cfg.device == "cpu" and not cfg.threads:
        cfg = replace(cfg, threads=max(1, (os.cpu_count() or 1) // world))  # ranks share the cores
    with process_group(backend_for(cfg.device), rank, world, init_method):
        results = run_benchmark(cfg, local_rank=rank)
    if rank == 0:
        atomic_write_bytes(result_path, json.dumps([asdict(r) for r in results]).encode())


def _spawn_benchmark(cfg: BenchConfig, world: int) -> list[VariantResult]:
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="effidense-bench-") as tmp:
        path = os.path.join(tmp, "results.json")
        mp.spawn(_bench_worker, args=(world, cfg, f"tcp://127.0.0.1:{free_port()}", path), nprocs=world, join=True)
        with open(path) as f:
            return [VariantResult(**r) for r in json.load(f)]


def benchmark(cfg: BenchConfig, processes: int = 1, command: str = "",
              depth_scales: Sequence[float] | None = None) -> BenchReport | None:
    """Run the whole benchmark: in this process, in ``processes`` spawned DDP workers, or as one torchrun rank.

    Returns the report on the main process and None on the other torchrun ranks. ``depth_scales`` adds the
    activation-memory-vs-depth sweep (:func:`memory_by_depth`), measured on the main process alone.
    """
    launched = torchrun_world()
    if cfg.max_batch and (processes > 1 or launched is not None):
        raise ValueError("--max-batch searches one GPU's memory; run it without --gpus/torchrun")
    if launched is not None:
        rank, local_rank, world = launched
        if processes not in (1, world):
            raise ValueError(f"--gpus {processes} contradicts torchrun's {world} processes; drop --gpus")
        check_world(cfg.device, world)
        with process_group(backend_for(cfg.device), rank, world, "env://"):
            results = run_benchmark(cfg, local_rank=local_rank)
        if rank != 0:
            return None
    elif processes > 1:
        world = processes
        check_world(cfg.device, world)
        results = _spawn_benchmark(cfg, world)
    else:
        world = 1
        results = run_benchmark(cfg)
    with torch_threads(cfg.threads):
        sweep = memory_by_depth(cfg, depth_scales) if depth_scales else None
        env = environment(cfg.device, command, world)
        floor = activation_floor(cfg)
    return BenchReport(cfg, results, env, world, sweep, floor)


def activation_floor(cfg: BenchConfig) -> int:
    """:func:`effidense.activation_floor_bytes` for one rank's batch in fp32 (measured on one image, every term
    is linear in the batch size)."""
    model = cfg.spec.build("plain").eval()
    image = torch.zeros(1, cfg.spec.arg("in_chans"), cfg.img_size, cfg.img_size)
    return activation_floor_bytes(model, image) * cfg.batch_size
