"""The planner's core: :func:`plan` measures steps on fake tensors and searches the largest batch and cube edge."""
from __future__ import annotations

import math
import multiprocessing
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..densenet import MEMORY_MODES
from ..failures import short_error
from ..harness import (
    AMP_DTYPES,
    COMPILE_SUFFIX,
    PEERS,
    StepMemory,
    StepProbe,
    StepSpec,
    build_variant,
    parse_variants,
    peer_unsupported,
)
from ..modelspec import ModelSpec, dims_of_size, resolve_model
from .budget import DEFAULT_MARGINS, DEVICES, format_bytes, parse_budget
from .scratch import KERNEL_SCRATCH, scratch_model
from .workers import cores, in_processes, pickles

__all__ = ["DTYPES", "NOT_COUNTED", "BudgetError", "VariantPlan", "PlanReport", "plan", "search_batch", "search_edge"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# What a prediction leaves out: it counts the tensors a step makes and, on the CPU, the scratch of the kernels a
# DenseNet step calls (.scratch); nothing a device's runtime or another library adds.
NOT_COUNTED = (
    "the CUDA context (a few hundred MiB per process, before any tensor)",
    "cuDNN and cuBLAS workspaces (scratch memory kernels allocate internally on a GPU)",
    "the caching allocator's rounding (blocks of 512 bytes and up) and fragmentation",
    "NCCL buffers under DDP, and anything else held by other processes or libraries",
)
NOT_COUNTED_CPU = ("scratch of kernels other than BatchNorm's and the convolutions' (small in a DenseNet step)",
                   "memory held by other processes or libraries")
MAX_BATCH_LIMIT = 1 << 24
MAX_EDGE_LIMIT = 1 << 14


class BudgetError(ValueError):
    """The budget cannot hold even the parameters."""


@dataclass
class VariantPlan:
    """One variant's predicted figures, in bytes (every figure is a prediction). ``status``: 'ok', 'skipped',
    'failed' or 'does-not-fit' (not even batch 1 fits the usable budget)."""

    name: str
    status: str = "ok"
    error: str | None = None
    batch: int | None = None
    size: list[int] | None = None
    peak_bytes: int | None = None
    parameter_bytes: int | None = None
    gradient_bytes: int | None = None
    optimizer_state_bytes: int | None = None
    saved_activation_bytes: int | None = None
    input_bytes: int | None = None
    at_peak: dict[str, int] | None = None  # what is live at the peak, by kind; sums to peak_bytes
    bytes_per_sample: float | None = None  # slope of the peak in the batch
    intercept_bytes: float | None = None  # the peak's affine fit at batch 0
    max_batch: int | None = None
    max_batch_peak_bytes: int | None = None
    max_batch_at_limit: bool = False  # the search stopped at its limit: the true maximum is at least max_batch
    max_edge: int | None = None  # largest cube edge at ``batch`` (3D inputs, or when asked)
    max_edge_peak_bytes: int | None = None
    probes: list[dict[str, Any]] = field(default_factory=list)  # every measured step: batch, size, peak_bytes
    measured_peak_bytes: int | None = None  # a real step's peak at ``batch`` by the device's allocator (measure=True)

    @property
    def measured_error(self) -> float | None:
        """(predicted - measured) / measured of the peak at ``batch``, where a real step was measured."""
        if not self.measured_peak_bytes or self.peak_bytes is None:
            return None
        return (self.peak_bytes - self.measured_peak_bytes) / self.measured_peak_bytes

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def static_bytes(self) -> int | None:
        """Parameters (and buffers), gradients and optimizer state."""
        if self.parameter_bytes is None:
            return None
        return self.parameter_bytes + (self.gradient_bytes or 0) + (self.optimizer_state_bytes or 0)

    @property
    def transient_bytes(self) -> int | None:
        """What the peak holds besides parameters, gradients, optimizer state, saved activations, the input and
        kernel scratch: the backward's temporaries and the recompute buffers."""
        return None if self.at_peak is None else self.at_peak["transient"]


@dataclass
class PlanReport:
    """A finished plan: the configuration, the budget, one :class:`VariantPlan` per variant."""

    config: dict[str, Any]
    budget_bytes: int | None
    margin: float
    variants: list[VariantPlan]
    not_counted: tuple[str, ...] = NOT_COUNTED
    scratch: str = KERNEL_SCRATCH["cuda"]  # what the device's kernel scratch model counts

    @property
    def usable_bytes(self) -> int | None:
        return None if self.budget_bytes is None else int(self.budget_bytes * (1 - self.margin))


@dataclass
class _Target:
    name: str
    builders: dict[str, Callable[[], nn.Module]]
    skipped: dict[str, str]
    in_chans: int
    num_classes: int
    min_size: int
    default_size: int | None
    spatial_dims: int = 2
    spec: ModelSpec | None = None  # None for a mapping of builders, whose widths the planner cannot know

    def size_problem(self, batch: int, size: Sequence[int]) -> str | None:
        return None if self.spec is None else self.spec.size_problem(batch, size)


def _target(model: str | ModelSpec | Mapping[str, Callable[[], nn.Module]], variants: str | Sequence[str] | None,
            in_chans: int, num_classes: int, min_size: int, name: str | None = None) -> _Target:
    if isinstance(model, Mapping):
        chosen = list(model) if variants is None else _names(variants)
        unknown = [v for v in chosen if v not in model]
        if unknown:
            raise ValueError(f"unknown variant(s) {', '.join(unknown)}; the model offers {', '.join(model)}")
        return _Target(name or "custom model", {v: model[v] for v in chosen}, {}, in_chans, num_classes, min_size,
                       None)
    spec = resolve_model(model) if isinstance(model, str) else model
    if variants is None:
        # the peers that can build the model; MONAI's only off the plane, where torchvision's and timm's cannot
        peers = [p for p in PEERS if peer_unsupported(spec, p) is None]
        chosen = [*MEMORY_MODES, *(p for p in peers if p != "monai" or len(peers) == 1)]
    else:
        chosen = parse_variants(variants)
    compiled = [v for v in chosen if v.endswith(COMPILE_SUFFIX)]
    if compiled:
        raise ValueError(f"variant(s) {', '.join(compiled)}: the planner predicts eager steps; drop {COMPILE_SUFFIX}")
    skipped = {v: r for v in chosen if v in PEERS and (r := peer_unsupported(spec, v))}
    builders = {v: (lambda v=v: build_variant(v, spec)) for v in chosen if v not in skipped}
    with torch.device("meta"):  # costs no memory
        min_edge = spec.build("plain").min_input_size
    return _Target(spec.name, builders, skipped, spec.arg("in_chans"), spec.arg("num_classes"), min_edge,
                   spec.default_img_size, spec.arg("spatial_dims"), spec)


def _names(text: str | Sequence[str]) -> list[str]:
    return [v.strip() for v in (text.split(",") if isinstance(text, str) else text) if v.strip()]


def _size(img_size: int | Sequence[int] | None, target: _Target) -> tuple[int, ...]:
    if img_size is None:
        if target.default_size is None:
            raise ValueError("img_size is needed for a custom model")
        img_size = target.default_size
    size = (int(img_size),) * target.spatial_dims if isinstance(img_size, int) else tuple(int(s) for s in img_size)
    if not 1 <= len(size) <= 3 or any(s < 1 for s in size):
        raise ValueError(f"input size must be 1 to 3 positive numbers (2D: H W, 3D: D H W), got {list(size)}")
    if min(size) < target.min_size:
        shown = "x".join(map(str, size))
        need = "x".join([str(target.min_size)] * len(size))
        raise ValueError(f"input {shown} is too small for {target.name}: it needs at least {need}")
    return size


def plan(model: str | ModelSpec | Mapping[str, Callable[[], nn.Module]] = "effi_densenet121", *,
         variants: str | Sequence[str] | None = None, img_size: int | Sequence[int] | None = None,
         batch_size: int = 64, amp: str | None = None, dtype: str = "fp32", optimizer: str = "sgd",
         budget: str | int | None = None, max_edge: bool | None = None,
         in_chans: int = 3, num_classes: int = 1000, min_size: int = 1, fake: bool = True,
         progress: Callable[[str], None] | None = None, name: str | None = None, device: str = "cuda",
         margin: float | None = None, measure: bool = False, workers: int | None = 1, line: bool = False) -> PlanReport:
    """Predict each variant's peak memory for one training step, and the largest batch that fits ``budget``.

    ``model``: an ``effi_*`` or config name, a :class:`~effidense.modelspec.ModelSpec`, or a mapping from variant
    name to a function building the model (then ``in_chans``, ``num_classes`` and ``min_size``, the smallest edge
    the network accepts, describe it, and ``name`` names it; a model whose output has spatial dims is trained
    with a label per position, as segmentation is). ``variants``: bench's names (``plain``, ``efficient``,
    ``frugal``, ``tv``, ``tv-plain``, ``timm``; default: our modes and the peers that can build the model).
    ``img_size``: an int (a square) or the spatial size, 2D ``(H, W)`` or 3D ``(D, H, W)``. ``amp``: autocast
    dtype ``bf16``/``fp16``;
    ``dtype``: the parameters' and input's dtype. ``optimizer``: ``none``, ``sgd``, ``sgd-momentum`` or ``adamw``.
    ``budget``: bytes, a size (``24GiB``) or a GPU preset (``h100-80gb``); the search uses ``1 - margin`` of it
    (default: the device's, :data:`~.budget.DEFAULT_MARGINS`). ``device``: what the step runs on, ``cuda`` or
    ``cpu``, whose kernels' scratch is modelled (:mod:`.scratch`; on the CPU at the current torch thread count).
    ``measure``: then run one real step of each variant at ``batch_size`` on ``device`` (the current CUDA device)
    and record its peak by the allocator (``measured_peak_bytes``), after checking the predicted peaks fit the
    device's free memory.
    ``max_edge``: also search the largest cube edge at ``batch_size`` (default: for 3D inputs). ``line``: fit the
    peak's line in the batch (``bytes_per_sample``, ``intercept_bytes``) without a budget too, at a step more for each
    variant (a budget's search fits it anyway).
    ``fake=False`` runs the same steps on real tensors (to validate the prediction at small sizes).
    ``workers``: how many variants are planned at once, each in a spawned process of its own (1: one at a time, in
    this process; None: this process plans too, beside a worker for each further CPU core this process may use,
    started once the plan has taken longer than a worker takes to start; real steps, and a ``measure`` run, go one at
    a time, in this process). Spawned processes import the calling script again, so a script that asks for more than
    one guards its top level (``if __name__ == "__main__":``), as ``multiprocessing`` requires; the ``effidense plan``
    command does.

    Every figure is a prediction from tensors that allocate nothing (``FakeTensorMode``), counted storage by
    storage; :data:`NOT_COUNTED` names what it leaves out. Raises ValueError for bad input (one line each).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if amp is not None and amp not in AMP_DTYPES:
        raise ValueError(f"amp must be one of {', '.join(AMP_DTYPES)} or None, got {amp!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    margin = DEFAULT_MARGINS[device] if margin is None else margin
    if not 0 <= margin < 1:
        raise ValueError(f"margin must be at least 0 and below 1, got {margin}")
    budget_bytes = None if budget is None else parse_budget(budget)
    if isinstance(model, str):
        model = resolve_model(model)
    if isinstance(model, ModelSpec) and img_size is not None and not isinstance(img_size, int):
        dims = dims_of_size(img_size, model.arg("spatial_dims"), "spatial_dims" in model.kwargs,
                            f"img_size {list(img_size)}")
        if dims != model.arg("spatial_dims"):  # a named model's 3D (or 1D) form
            model = ModelSpec(model.name, {**model.kwargs, "spatial_dims": dims})
    target = _target(model, variants, in_chans, num_classes, min_size, name)
    size = _size(img_size, target)
    problem = target.size_problem(batch_size, size)
    if problem:
        raise ValueError(problem)
    step = StepSpec(in_chans=target.in_chans, num_classes=target.num_classes,
                    amp=AMP_DTYPES[amp] if amp else None, dtype=DTYPES[dtype], optimizer=optimizer)
    edge_search = len(size) == 3 if max_edge is None else max_edge
    config = {"model": target.name, "img_size": list(size), "batch_size": batch_size, "amp": amp, "dtype": dtype,
              "optimizer": optimizer, "max_edge": edge_search, "min_size": target.min_size,
              "tensors": "fake" if fake else "real", "device": device}
    if device == "cpu":
        config["threads"] = torch.get_num_threads()
    report = PlanReport(config, budget_bytes, margin, [], NOT_COUNTED_CPU if device == "cpu" else NOT_COUNTED,
                        KERNEL_SCRATCH[device])
    scratch = scratch_model(device)
    usable = report.usable_bytes
    report.variants += [VariantPlan(name, status="skipped", error=why) for name, why in target.skipped.items()]

    def planned(name: str) -> VariantPlan:
        if progress is not None:
            progress(f"{name} ...")
        result = VariantPlan(name, batch=batch_size, size=list(size))
        try:
            _plan_variant(result, StepProbe(target.builders[name], step, fake, scratch), batch_size, size, usable,
                          budget_bytes, margin, target, edge_search, line)
        except BudgetError:
            raise
        except Exception as error:
            result.status, result.error = "failed", short_error(error, kind=True)
        return result

    job = dict(model=model, img_size=img_size, batch_size=batch_size, amp=amp, dtype=dtype, optimizer=optimizer,
               budget=budget, max_edge=max_edge, in_chans=in_chans, num_classes=num_classes, min_size=min_size,
               name=name, device=device, margin=margin, line=line)
    # frugal's sliced backward makes the longest steps: planned first, the others fill the time beside it
    queue = sorted(target.builders, key=lambda name: name != "frugal")
    report.variants += _side_by_side(planned, queue, workers if fake and not measure else 1, job, progress)
    order = list(target.builders) + list(target.skipped)
    report.variants.sort(key=lambda r: order.index(r.name))
    if measure:
        _measure(report, target, step, size, progress)
    return report


def _plan_in_worker(job: dict, threads: int, name: str) -> VariantPlan:
    torch.set_num_threads(threads)  # the CPU scratch model reads it, as the planning process set it
    return plan(**job, variants=name, workers=1).variants[0]


# Seconds the variants run in this process alone before worker processes start for those still waiting (when the
# planner picks the number of workers): a tiny model's plan is done sooner and starts none. A worker takes seconds
# to start (importing torch and effidense), but starts beside this process's planning and takes a variant only once
# ready, so an early start costs a core's import, never a wait.
WORKER_START_S = 0.5


def _side_by_side(planned: Callable[[str], VariantPlan], names: list[str], workers: int | None, job: dict,
                  progress: Callable[[str], None] | None) -> list[VariantPlan]:
    """``planned(name)`` for each name in turn, here, or side by side in worker processes (:mod:`.workers`), each
    running ``plan(**job)`` for a variant, where the job pickles (not a model built by a local function).
    ``workers``: that many processes, this one waiting for them. None: this process plans too, and a worker for each
    further core takes variants from the same queue once the plan has taken longer than a worker takes to start (a
    tiny model's never does)."""
    here = workers is None
    workers = cores() - 1 if here else min(workers, len(names))
    # one worker and this process waiting for it would plan one variant at a time, as this process does alone
    if workers < (1 if here else 2) or len(names) < 2 or multiprocessing.current_process().daemon or not pickles(job):
        return [planned(name) for name in names]
    if progress is not None and not here:
        progress(f"{', '.join(names)}: {workers} at a time, in processes of their own ...")

    def taken(name: str) -> None:
        if progress is not None:
            progress(f"{name} ... (in a worker process)")

    def done(name: str, count: int) -> None:
        if progress is not None:
            progress(f"{name} planned ({count}/{len(names)})")

    threads = torch.get_num_threads()
    answers = in_processes(_plan_in_worker, [(name, (job, threads, name)) for name in names], workers, done,
                           here=planned if here else None, wait=WORKER_START_S, taken=taken if here else None)
    return [VariantPlan(name, status="failed", error=str(a)) if isinstance(a, ChildProcessError) else a
            for name, a in ((name, answers[name]) for name in names)]


def free_bytes(device: str) -> int:
    """Memory a step could take now: the CUDA device's free memory, or the CPU's available memory."""
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    try:  # Linux: what can be allocated without swapping, page cache included
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _measure(report: PlanReport, target: _Target, step: StepSpec, size: tuple[int, ...],
             progress: Callable[[str], None] | None) -> None:
    """One real step of each planned variant on the report's device, measured by its allocator."""
    device = report.config["device"]
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("measuring a step on cuda needs a CUDA GPU, and torch sees none: measure on the cpu")
    batch = report.config["batch_size"]
    planned = [r for r in report.variants if r.ok]
    need = max((r.peak_bytes for r in planned), default=0)
    free = free_bytes(device)
    if need > free:
        worst = next(r.name for r in planned if r.peak_bytes == need)
        raise ValueError(f"batch {batch} does not fit this machine: {worst} needs a predicted {format_bytes(need)} "
                         f"and {device} has {format_bytes(free)} free; measure a smaller batch")
    for r in planned:
        if progress is not None:
            progress(f"{r.name}: a real step ...")
        try:
            probe = StepProbe(target.builders[r.name], step, fake=False, device=device)
            r.measured_peak_bytes = probe.allocator_peak(batch, size)
        except Exception as error:
            r.status, r.error = "failed", f"the real step: {short_error(error, kind=True)}"
        finally:
            probe = None


class _Peaks:
    """Memoized peaks of a probe's steps, each recorded in the variant's probes."""

    def __init__(self, probe: StepProbe, result: VariantPlan) -> None:
        self.probe, self.result = probe, result
        self.cache: dict[tuple[int, tuple[int, ...]], StepMemory] = {}

    def step(self, batch: int, size: tuple[int, ...]) -> StepMemory:
        key = (batch, size)
        if key not in self.cache:
            memory = self.probe.measure(batch, size)
            counts = {"peak": memory.peak_bytes, "parameters": memory.parameter_bytes, "input": memory.input_bytes,
                      "saved activations": memory.saved_activation_bytes, **memory.at_peak}
            negative = {name: n for name, n in counts.items() if n < 0}
            if negative:  # torch's int64 sizes wrapped around somewhere: no figure of this step can be trusted
                name, n = next(iter(negative.items()))
                raise RuntimeError(f"batch {batch} at {'x'.join(map(str, size))} counted {n} bytes of {name}: "
                                   "a size overflowed")
            self.cache[key] = memory
            self.result.probes.append({"batch": batch, "size": list(size), "peak_bytes": memory.peak_bytes})
        return self.cache[key]

    def __call__(self, batch: int, size: tuple[int, ...]) -> int:
        return self.step(batch, size).peak_bytes


def _plan_variant(result: VariantPlan, probe: StepProbe, batch: int, size: tuple[int, ...], usable: int | None,
                  budget: int | None, margin: float, target: _Target, edge_search: bool,
                  line: bool = False) -> None:
    peaks = _Peaks(probe, result)
    first = peaks.step(batch, size)
    result.peak_bytes = first.peak_bytes
    result.at_peak = first.at_peak
    result.parameter_bytes = first.parameter_bytes
    result.gradient_bytes = first.gradient_bytes
    result.optimizer_state_bytes = first.optimizer_state_bytes
    result.saved_activation_bytes = first.saved_activation_bytes
    result.input_bytes = first.input_bytes
    if usable is None and not line:  # the line costs a step more
        return
    second = _toward(first, usable)
    result.bytes_per_sample = (peaks(second, size) - first.peak_bytes) / (second - batch)
    result.intercept_bytes = first.peak_bytes - result.bytes_per_sample * batch
    if usable is None:
        return
    if first.parameter_bytes > usable:
        raise BudgetError(
            f"budget {format_bytes(budget)} ({format_bytes(usable)} after the {margin:.0%} safety margin) is "
            f"smaller than the parameters alone ({format_bytes(first.parameter_bytes)} for {target.name}): short "
            f"by {format_bytes(first.parameter_bytes - usable)}")
    result.max_batch = search_batch(lambda n: peaks(n, size), usable, [batch, second], MAX_BATCH_LIMIT, exact=True)
    if result.max_batch == 0:
        result.status = "does-not-fit"
        result.error = (f"does not fit even at batch 1: predicted peak {format_bytes(peaks(1, size))} > "
                        f"{format_bytes(usable)} usable")
        return
    result.max_batch_peak_bytes = peaks(result.max_batch, size)
    result.max_batch_at_limit = result.max_batch == MAX_BATCH_LIMIT
    if edge_search:
        static = first.parameter_bytes + first.gradient_bytes + first.optimizer_state_bytes
        edge = search_edge(lambda e: peaks(batch, (e,) * len(size)), usable, size, first.peak_bytes, static,
                            target.min_size, MAX_EDGE_LIMIT)
        result.max_edge = edge
        if edge:
            result.max_edge_peak_bytes = peaks(batch, (edge,) * len(size))


def _toward(first: StepMemory, usable: int | None) -> int:
    """The batch of a variant's second step: twice the first's without a budget; with one, the batch that would
    reach it if all that grows with the batch at the first step's peak (all but parameters, gradients and optimizer
    state) grew in proportion. That lies near the answer, so the line through the two steps misses it by little."""
    batch = first.batch
    static = sum(first.at_peak.get(kind, 0) for kind in ("parameters", "gradients", "optimizer_state"))
    if usable is None or first.peak_bytes <= static:
        return 2 * batch
    guess = min(max(math.floor((usable - static) * batch / (first.peak_bytes - static)), 1), MAX_BATCH_LIMIT)
    return guess if guess != batch else batch + 1 if batch < MAX_BATCH_LIMIT else batch - 1


def search_batch(peak: Callable[[int], int], usable: int, measured: Sequence[int], limit: int,
                 exact: bool = False) -> int:
    """The largest batch in ``[0, limit]`` whose ``peak(batch)`` is at most ``usable`` (0: not even batch 1).

    A step's peak is the largest of its moments' live bytes, each affine in the batch with a non-negative slope, so
    it is convex in the batch (and affine in practice). Each round solves the line through the two latest
    measurements and measures there; convexity bounds the answer on both sides (a chord lies above the curve, its
    extension below), so the search usually ends after one confirming step.

    ``exact``: where the step changes with the batch (torch's CPU convolutions turn to oneDNN, with its scratch, from
    batch 16 on one thread; a frugal backward is sliced from a batch of 2, and where its reruns pass 32 MiB), the peak
    jumps and is no longer convex: the answer and the batch above it are then measured, and bisection between
    measured batches (the peak still grows with the batch) settles it. The planner always asks for it."""
    points: dict[int, int] = {n: peak(n) for n in measured}
    lo, hi = 0, limit + 1  # lo fits (batch 0 trivially), hi does not
    last: list[int] = list(measured)
    while True:
        for n, p in points.items():
            if p <= usable:
                lo = max(lo, n)
            else:
                hi = min(hi, n)
        ordered = sorted(points)
        for a, b in zip(ordered, ordered[1:], strict=False):
            pa, pb = points[a], points[b]
            slope = (pb - pa) / (b - a)
            if pa <= usable < pb:  # the chord lies above the curve: where it is under the budget, the curve is too
                lo = max(lo, a + math.floor((usable - pa) / slope))
            if pb <= usable and slope > 0:  # the chord's extension lies below the curve beyond b
                hi = min(hi, b + math.floor((usable - pb) / slope) + 1)
        if hi - lo <= 1:
            return _measured_bound(peak, usable, points, lo, limit) if exact else min(lo, limit)
        a, b = sorted(last[-2:])
        slope = (points[b] - points[a]) / (b - a) if b != a else 0
        guess = a + math.floor((usable - points[a]) / slope) if slope > 0 else hi - 1
        guess = min(max(guess, lo + 1), hi - 1)
        if guess in points:  # the line gives nothing new: halve the interval
            guess = (lo + hi) // 2
        points[guess] = peak(guess)
        last.append(guess)


def _measured_bound(peak: Callable[[int], int], usable: int, points: dict[int, int], guess: int, limit: int) -> int:
    """The largest batch that fits by measurement alone: ``guess``, then while no batch above the largest that fits
    is known not to, steps up from it of 1, 2, 4, ... (the answer lies near the guess), then bisection between the
    largest measured batch that fits and the smallest above it that does not."""
    step = 1
    while True:
        fits = max([0, *(n for n, p in points.items() if p <= usable)])
        over = min([limit + 1, *(n for n, p in points.items() if p > usable and n > fits)])
        if over - fits <= 1:
            return min(fits, limit)
        if fits < guess < over and guess not in points:
            n = guess
        elif over > limit:
            n, step = min(fits + step, limit), 2 * step
        else:
            n = (fits + over) // 2
        points[n] = peak(n)


def search_edge(peak: Callable[[int], int], usable: int, size: Sequence[int], peak_at_size: int, static: int,
                min_edge: int, limit: int) -> int | None:
    """The largest cube edge in ``[min_edge, limit]`` whose ``peak(edge)`` fits ``usable`` (None: not even the
    smallest), the peak growing with the edge. What grows with the input scales with its volume: the first guess
    scales the step at ``size``, and each next one solves the line in the volume through the nearest steps on either
    side of the budget (the two latest until both sides have one), kept strictly between the largest edge measured
    to fit and the smallest measured not to, so the search ends with the answer and the edge above it both measured.
    After six steps it bisects."""
    dims = len(size)
    grows = max(peak_at_size - static, 1)
    volume = math.prod(size)
    guess = math.floor((volume * max(usable - static, 0) / grows) ** (1 / dims)) if usable > static else min_edge
    lo, hi = min_edge - 1, limit + 1  # lo fits (min_edge - 1: nothing is known to), hi does not
    below = (volume, peak_at_size) if peak_at_size <= usable else None  # (volume, peak) nearest under the budget
    above = None if below else (volume, peak_at_size)  # and over it
    latest = [(volume, peak_at_size)]
    while hi - lo > 1:
        if len(latest) > 6:  # a curve the line does not follow: halve the interval
            guess = (lo + hi) // 2
        guess = min(max(guess, lo + 1), hi - 1)  # every measured edge lies at lo or below, or at hi or above
        measured = peak(guess)
        if measured <= usable:
            lo, below = guess, (guess ** dims, measured)
        else:
            hi, above = guess, (guess ** dims, measured)
        latest.append((guess ** dims, measured))
        (v0, p0), (v1, p1) = (below, above) if below and above else latest[-2:]
        slope = (p1 - p0) / (v1 - v0) if v1 != v0 else 0
        guess = math.floor(max(v1 + (usable - p1) / slope, 0) ** (1 / dims)) if slope > 0 else (lo + hi) // 2
    return lo if lo >= min_edge else None
