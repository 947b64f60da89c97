"""The GPU evidence run: one command measures the whole matrix of issue 13 on a CUDA GPU.

Sections, most important first (each is written to ``DIR/report.json`` and ``DIR/summary.md`` as soon as it ends,
and the step-time section also after each of its cells, so a run cut short keeps what it measured):

1. ``step-time``: DenseNet-121, 224 px, batch 64 and 256, bf16 autocast and fp32 (TF32 on), channels_last on and
   off: step time, images/s and peak memory of torchvision (plain and ``memory_efficient=True``), timm
   (``set_grad_checkpointing()``), effidense plain / efficient / frugal and two compiled paths of efficient
   (``set_compile`` regional, whole-model ``torch.compile``). The compiled paths run in the first cell (bf16,
   channels_last, batch 64) and in a last fp32 cell, so that their compile time does not starve the eager cells.
2. ``max-batch``: largest batch (doubling, then bisection; only running out of memory counts as "does not fit") of
   DenseNet-121, 224 px, bf16, under a 12 GiB cap (``torch.cuda.set_per_process_memory_fraction``) and on the whole
   GPU.
3. ``seed``: the seed project's setting (DenseNet-BC (12,12,12), k=12, 32 px, batch 128, fp32, TF32 off): forward,
   backward and R = B/F beside its published 1080 Ti table, and the largest batch under the 12 GiB cap.
4. ``depth``: the deepest DenseNet-BC (k=12, 3 equal blocks, 32 px, batch 64) that trains one step under the cap,
   by bisection over the layers per block.
5. ``host-bound``: the fraction of a step the GPU is idle (torch.profiler: union of kernel intervals against the
   step's wall time) for efficient and the best compiled path.
6. ``correctness``: ``tools/gradcheck.py --device cuda`` and ``python -m pytest -m cuda`` as subprocesses.

Each section gets a share of ``--time-budget`` (time a section leaves unused passes to the later ones); a section
that runs out of time or fails is recorded as such, keeps its partial results, and the run goes on.

``--smoke`` runs the same code on the CPU with tiny models in well under two minutes: memory caps become byte budgets
on :class:`effidense.SavedTensorMeter`'s deterministic count (so both searches really bisect), the compiled paths use
the ``aot_eager`` backend (dynamo and AOT autograd without inductor's C++ build), the profiler records CPU activity,
and the correctness section runs gradcheck on the CPU and ``pytest -m cuda`` (whose tests skip without a GPU).
``effidense.cli.gpu_report`` is the command-line front.
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .benchmark import (
    autocast,
    build_variant,
    environment,
    is_oom,
    largest_batch,
    one_line,
    ratio,
    torch_threads,
)
from .fileio import atomic_write_bytes
from .memory import MiB, SavedTensorMeter, cuda_peak_bytes
from .modelspec import ModelSpec, resolve_model

__all__ = ["SECTIONS", "VARIANTS", "Plan", "Cell", "OutOfTime", "gpu_plan", "smoke_plan", "run_report",
           "format_summary", "busy_time", "GiB"]

GiB = 1 << 30
SCHEMA = "effidense.gpu_report/1"
REPORT_JSON, SUMMARY_MD = "report.json", "summary.md"

# Section name: (title, share of the time budget). Shares are of what is left when the section starts, so time one
# section leaves unused goes to the later ones.
SECTIONS: dict[str, tuple[str, float]] = {
    "step-time": ("DenseNet-121 step time, images/s and peak memory", 0.40),
    "max-batch": ("Largest batch, DenseNet-121 224 px bf16", 0.20),
    "seed": ("The seed's setting: DenseNet-BC (12,12,12), k=12, 32 px, batch 128, fp32", 0.07),
    "depth": ("Deepest DenseNet-BC (k=12, 32 px, batch 64) under the memory cap", 0.14),
    "host-bound": ("Host-bound check: GPU idle fraction of a step", 0.06),
    "correctness": ("Correctness on the device: gradcheck and pytest -m cuda", 0.13),
}

VARIANTS: dict[str, str] = {
    "tv": "torchvision plain",
    "tv-me": "torchvision memory_efficient=True",
    "timm-ckpt": "timm set_grad_checkpointing()",
    "plain": "effidense plain",
    "efficient": "effidense efficient",
    "frugal": "effidense frugal",
    "efficient+set_compile": "effidense efficient, set_compile (regional)",
    "efficient+torch.compile": "effidense efficient, whole-model torch.compile",
}
EAGER = ("tv", "tv-me", "timm-ckpt", "plain", "efficient", "frugal")
COMPILED = ("efficient+set_compile", "efficient+torch.compile")

# The seed project's published 1080 Ti table (DenseNet-BC (12,12,12), k=12, 32 px, batch 128, fp32), in ms.
SEED_TIMES = {"plain": (38.0, 77.9), "efficient": (38.0, 103.5)}
SEED_MAX_BATCH = {"plain": 350, "efficient": 1450}
PAPER_DEPTH = {"plain": 160, "efficient": 480}  # ~layers that train on 12 GB (Pleiss et al.)

GOAL_STEP_RATIO, GOAL_MEMORY_X = 1.10, 4.0
GOAL_BATCH_X = {"efficient": 6.0, "frugal": 15.0}
GOAL_FRUGAL_DEPTH = 2000


class OutOfTime(Exception):
    """The current section's share of the time budget is spent."""


@dataclass(frozen=True)
class Cell:
    """One setting of the step-time matrix."""

    batch: int
    amp: str | None
    channels_last: bool
    variants: tuple[str, ...]

    @property
    def label(self) -> str:
        return f"batch {self.batch}, {self.amp or 'fp32'}{', channels_last' if self.channels_last else ''}"


@dataclass(frozen=True)
class Cap:
    """A memory limit: real (a fraction of the GPU, None = the whole GPU) or, in smoke runs, a meter byte budget."""

    label: str
    bytes: int | None


@dataclass(frozen=True)
class Plan:
    """Everything a run measures: the GPU plan or its tiny CPU stand-in."""

    smoke: bool
    device: str
    dn121: ModelSpec
    img_size: int
    cells: tuple[Cell, ...]
    warmup: int
    steps: int
    compile_options: dict[str, Any]
    caps: tuple[Cap, ...]
    batch_unit: int  # max-batch searches run over multiples of this (fewer probes of huge batches)
    batch_start: int
    batch_limit: int
    seed_spec: ModelSpec
    seed_img: int
    seed_batch: int
    depth_growth: int
    depth_img: int
    depth_batch: int
    depth_start: int
    depth_limit: int
    profile_steps: int
    gradcheck_args: tuple[str, ...]
    time_budget_s: float
    threads: int | None = None  # torch CPU threads (tiny models run fastest on one; None: leave as is)
    seed_cap: Cap | None = None  # the seed section's cap when not ``cap`` (smoke: its model needs a larger budget)

    @property
    def cap(self) -> Cap:
        """The 12 GiB cap (or its smoke stand-in), used by the seed and depth sections."""
        return self.caps[0]


def _cells(batches: Sequence[int]) -> tuple[Cell, ...]:
    """The step-time matrix, most important first: batch 64 before 256, bf16 before fp32, channels_last first.

    The compiled paths join the first cell, and a last fp32 cell of their own (with torchvision plain to compare).
    """
    small, large = batches
    cells = []
    for batch in (small, large):
        for amp in ("bf16", None):
            for channels_last in (True, False):
                extra = COMPILED if not cells else ()
                cells.append(Cell(batch, amp, channels_last, EAGER + extra))
    cells.append(Cell(small, None, True, ("tv", "efficient") + COMPILED))
    return tuple(cells)


def _bc_spec(blocks: Sequence[int], growth: int, name: str) -> ModelSpec:
    return ModelSpec(name, dict(growth_rate=growth, block_config=tuple(blocks), num_init_features=2 * growth,
                                small_inputs=True, num_classes=10))


def gpu_plan(time_budget_s: float = 510.0) -> Plan:
    """The matrix of issue 13 on one CUDA GPU, budgeted to finish in under 9 minutes on an H100."""
    return Plan(
        smoke=False, device="cuda", dn121=resolve_model("densenet121"), img_size=224, cells=_cells((64, 256)),
        warmup=2, steps=5, compile_options={}, caps=(Cap("12 GiB", 12 * GiB), Cap("whole GPU", None)),
        batch_unit=8, batch_start=64, batch_limit=1 << 16,
        seed_spec=_bc_spec((12, 12, 12), 12, "DenseNet-BC (12,12,12) k=12"), seed_img=32, seed_batch=128,
        depth_growth=12, depth_img=32, depth_batch=64, depth_start=16, depth_limit=2048,
        profile_steps=5, gradcheck_args=("--device", "cuda", "--quiet"), time_budget_s=time_budget_s)


def smoke_plan(time_budget_s: float = 115.0) -> Plan:
    """The same run on the CPU with tiny models; caps are byte budgets on the deterministic meter."""
    tiny = ModelSpec("tiny DenseNet-BC (stands in for DenseNet-121)",
                     dict(growth_rate=4, block_config=(2, 2), num_init_features=8, num_classes=10))
    return Plan(
        smoke=True, device="cpu", dn121=tiny, img_size=16, cells=_cells((4, 8)), warmup=1, steps=2,
        compile_options={"backend": "aot_eager"},
        caps=(Cap("64 KiB of saved activations (meter; stands in for 12 GiB)", MiB // 16),
              Cap("256 KiB of saved activations (meter; stands in for the whole GPU)", MiB // 4)),
        batch_unit=1, batch_start=4, batch_limit=1024,
        seed_spec=_bc_spec((2, 2, 2), 4, "tiny DenseNet-BC (2,2,2) k=4 (stands in for (12,12,12) k=12)"),
        seed_img=16, seed_batch=16,
        depth_growth=4, depth_img=8, depth_batch=2, depth_start=2, depth_limit=256,
        profile_steps=2, gradcheck_args=("--device", "cpu", "--quiet"), time_budget_s=time_budget_s, threads=1,
        seed_cap=Cap("1 MiB of saved activations (meter; stands in for 12 GiB)", MiB))


# --- building and stepping models ---

def build_model(name: str, spec: ModelSpec, compile_options: dict[str, Any]) -> nn.Module:
    """A fresh uncompiled model for variant ``name`` (compile with :func:`compile_variant` after loading weights)."""
    if name == "tv":
        model = build_variant("tv", spec)
        for module in model.modules():  # torchvision's dense layers each carry the switch
            if hasattr(module, "memory_efficient"):
                module.memory_efficient = False
        return model
    if name == "tv-me":
        return build_variant("tv", spec)
    if name == "timm-ckpt":
        return build_variant("timm", spec)
    if name in VARIANTS:
        return build_variant(name.split("+")[0], spec)
    raise ValueError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")


def compile_variant(name: str, model: nn.Module, compile_options: dict[str, Any]) -> nn.Module:
    if name == "efficient+set_compile":
        return model.set_compile(True, **compile_options)
    if name == "efficient+torch.compile":
        return torch.compile(model, **compile_options)
    return model


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, amp: str | None) -> torch.Tensor:
    with autocast(x.device, amp):
        out = model(x)
    return F.cross_entropy(out.float(), y)


def _step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, amp: str | None) -> None:
    """One training step without the optimizer update: zero_grad, forward, loss, backward."""
    model.zero_grad(set_to_none=True)
    _loss(model, x, y, amp).backward()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, amp: str | None) -> tuple[float, float]:
    """(forward ms, backward ms): CUDA events on a GPU (queued kernels count), perf_counter on the CPU."""
    device = x.device
    model.zero_grad(set_to_none=True)
    _sync(device)
    if device.type == "cuda":
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        marks[0].record()
        loss = _loss(model, x, y, amp)
        marks[1].record()
        loss.backward()
        marks[2].record()
        _sync(device)
        return marks[0].elapsed_time(marks[1]), marks[1].elapsed_time(marks[2])
    t0 = time.perf_counter()
    loss = _loss(model, x, y, amp)
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    return (t1 - t0) * 1e3, (t2 - t1) * 1e3


def _batch(spec: ModelSpec, batch: int, img: int, device: torch.device, channels_last: bool,
           seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, spec.arg("in_chans"), img, img, generator=generator)
    y = torch.randint(0, spec.arg("num_classes"), (batch,), generator=generator)
    x = x.to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device)


def _release(device: torch.device) -> None:
    """Return a failed or finished model's GPU memory to the device (a full gc is too slow to run per probe on the
    CPU, where nothing needs returning)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


@contextlib.contextmanager
def _tf32(enabled: bool) -> Iterator[None]:
    """TF32 matmuls and convolutions on or off for the block (only matters on Ampere and later GPUs)."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


# --- the run: budget, sections, writing ---

class _Run:
    """State of one run: the plan, the clock, the report so far and where it is written."""

    def __init__(self, plan: Plan, out_dir: Path, sections: Sequence[str], command: str,
                 log: Callable[[str], None]) -> None:
        self.plan, self.out_dir, self.sections, self.log = plan, out_dir, list(sections), log
        self.device = torch.device(plan.device)
        self.started = time.monotonic()
        self.end = self.started + plan.time_budget_s
        self.deadline = self.end
        self.report: dict[str, Any] = {
            "schema": SCHEMA, "complete": False, "smoke": plan.smoke,
            "environment": environment(plan.device, command),
            "plan": _plan_to_json(plan),
            "sections": {name: {"title": SECTIONS[name][0], "status": "pending"} for name in self.sections},
        }

    def start_section(self, name: str) -> dict[str, Any]:
        now = time.monotonic()
        later = self.sections[self.sections.index(name):]
        share = SECTIONS[name][1] / sum(SECTIONS[s][1] for s in later)
        self.deadline = now + max(self.end - now, 0.0) * share
        section = self.report["sections"][name]
        section.update(status="running", budget_s=round(self.deadline - now, 1), data={}, goals=[])
        self.save()
        return section

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise OutOfTime("its share of the time budget is spent")

    def remaining(self) -> float:
        return max(self.deadline - time.monotonic(), 0.0)

    def save(self) -> None:
        """Write the report and its summary, each atomically: a run killed at any moment leaves complete files."""
        self.report["elapsed_s"] = round(time.monotonic() - self.started, 1)
        atomic_write_bytes(self.out_dir / REPORT_JSON, (json.dumps(self.report, indent=2) + "\n").encode())
        atomic_write_bytes(self.out_dir / SUMMARY_MD, (format_summary(self.report) + "\n").encode())


def _plan_to_json(plan: Plan) -> dict[str, Any]:
    data = asdict(plan)
    for key in ("dn121", "seed_spec"):
        spec: ModelSpec = getattr(plan, key)
        data[key] = {"name": spec.name, "depth": spec.depth,
                     "kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in spec.kwargs.items()}}
    return data


def run_report(plan: Plan, out_dir: str | os.PathLike[str], sections: Sequence[str] | None = None,
               command: str = "", log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run ``sections`` (default: all, always in importance order) and return the report; ``out_dir`` must exist.

    The report and summary are rewritten after every section (and every step-time cell), so an interrupted run
    leaves what it measured. A section that raises is recorded as failed and the run goes on.
    """
    chosen = [s for s in SECTIONS if sections is None or s in sections]
    run = _Run(plan, Path(out_dir), chosen, command, log or (lambda text: None))
    if run.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    with torch_threads(plan.threads):
        _run_sections(run)
    return run.report


def _run_sections(run: _Run) -> None:
    for name in run.sections:
        section = run.start_section(name)
        run.log(f"[{name}] {section['title']} (budget {section['budget_s']:.0f} s)")
        start = time.monotonic()
        try:
            _SECTION_RUNNERS[name](run, section)
            section["status"] = "ok"
        except OutOfTime as error:
            section["status"], section["error"] = "out of time", str(error)
        except Exception as error:  # recorded; the next section still runs
            section["status"], section["error"] = "failed", one_line(error)
        finally:
            section["seconds"] = round(time.monotonic() - start, 1)
            _release(run.device)
            if run.device.type == "cuda":
                torch.cuda.set_per_process_memory_fraction(1.0, run.device)
        try:
            _GOALS.get(name, lambda r, s: None)(run, section)
        except Exception as error:  # a bug in judging goals must not cost the measurements
            section["goals"].append(_goal("judging the goals", None, one_line(error)))
        run.log(f"[{name}] {section['status']} in {section['seconds']:.1f} s"
                + (f": {section['error']}" if section.get("error") else ""))
        run.save()
    run.report["complete"] = True
    run.save()


# --- section 1: step time ---

def _prepare(run: _Run, name: str, spec: ModelSpec, state: dict[str, torch.Tensor], channels_last: bool,
             ) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(name, spec, run.plan.compile_options)
    model.load_state_dict(state)
    model.to(run.device).train()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return compile_variant(name, model, run.plan.compile_options)


def measure_cell(run: _Run, spec: ModelSpec, img: int, cell: Cell, warmup: int, steps: int,
                 rows: dict[str, dict[str, Any]]) -> None:
    """Fill ``rows`` (variant -> numbers) for one setting: each variant is built with the same weights, warmed up
    (the first step compiles), measured for memory, then the variants take turns over ``steps`` timed rounds.
    On running out of time the rounds done so far are kept."""
    device = run.device
    torch.manual_seed(0)
    state = spec.build("plain").state_dict()
    x, y = _batch(spec, cell.batch, img, device, cell.channels_last)
    models: dict[str, nn.Module] = {}
    try:
        for name in cell.variants:
            run.check_time()
            row = rows.setdefault(name, {"variant": name, "label": VARIANTS[name], "status": "ok"})
            try:
                model = _prepare(run, name, spec, state, cell.channels_last)
                first = None
                for i in range(max(warmup, 1)):
                    _sync(device)
                    t0 = time.perf_counter()
                    _step(model, x, y, cell.amp)
                    _sync(device)
                    first = time.perf_counter() - t0 if i == 0 else first
                row["first_step_s"] = round(first, 3)
                if name not in COMPILED:  # the meter under compiled code would only recompile
                    model.zero_grad(set_to_none=True)
                    with SavedTensorMeter(exclude=model) as meter:
                        loss = _loss(model, x, y, cell.amp)
                    del loss
                    row["activation_bytes"] = meter.bytes
                if device.type == "cuda":
                    model.zero_grad(set_to_none=True)
                    row["peak_bytes"] = cuda_peak_bytes(lambda m=model: _step(m, x, y, cell.amp), device)
                model.zero_grad(set_to_none=True)
                models[name] = model
            except OutOfTime:
                raise
            except Exception as error:
                row.update(status="failed", error=one_line(error))
                model = None
                _release(device)
        samples: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
        try:
            for _ in range(steps):
                run.check_time()
                for name in list(models):
                    try:
                        samples[name].append(_timed_step(models[name], x, y, cell.amp))
                    except Exception as error:
                        rows[name].update(status="failed", error=one_line(error))
                        del models[name]
                        _release(device)
        finally:
            _finish_rows(rows, samples, cell.batch)
    finally:
        models.clear()
        _release(device)


def _finish_rows(rows: dict[str, dict[str, Any]], samples: dict[str, list[tuple[float, float]]], batch: int) -> None:
    for name, pairs in samples.items():
        row = rows[name]
        if row["status"] != "ok" or not pairs:
            continue
        forward, backward = [p[0] for p in pairs], [p[1] for p in pairs]
        steps = [f + b for f, b in pairs]
        row.update(rounds=len(pairs), forward_ms=statistics.median(forward), backward_ms=statistics.median(backward),
                   step_ms=statistics.median(steps), step_samples_ms=steps)
        row["ratio_b_f"] = ratio(row["backward_ms"], row["forward_ms"])
        row["images_per_s"] = batch / (row["step_ms"] / 1e3) if row["step_ms"] else None
        if row.get("first_step_s") is not None and name in COMPILED:
            row["compile_s"] = max(row["first_step_s"] - row["step_ms"] / 1e3, 0.0)
    for reference, key in (("tv", "vs_tv"), ("plain", "vs_plain")):
        ref = rows.get(reference)
        if not ref or ref.get("step_ms") is None:
            continue
        for row in rows.values():
            if row.get("step_ms") is None:
                continue
            paired = [a / b for a, b in zip(row["step_samples_ms"], ref["step_samples_ms"], strict=False) if b]
            row[f"step_{key}"] = statistics.median(paired) if paired else ratio(row["step_ms"], ref["step_ms"])
            row[f"memory_x_less_{key}"] = ratio(_memory(ref), _memory(row))


def _memory(row: dict[str, Any]) -> int | None:
    """Peak bytes on a GPU; the meter's activation bytes on the CPU (smoke runs); compiled rows have no meter count
    of their own, so they show None there."""
    return row.get("peak_bytes", row.get("activation_bytes"))


def _section_step_time(run: _Run, section: dict[str, Any]) -> None:
    plan = run.plan
    cells = section["data"].setdefault("cells", [])
    section["data"]["memory"] = "peak CUDA bytes" if run.device.type == "cuda" else "meter activation bytes"
    for i, cell in enumerate(plan.cells):
        run.check_time()
        entry = {"label": cell.label, "batch": cell.batch, "amp": cell.amp, "channels_last": cell.channels_last,
                 "rows": {}}
        cells.append(entry)
        run.log(f"[step-time] cell {i + 1}/{len(plan.cells)}: {cell.label}")
        with _tf32(cell.amp is None):  # fp32 means TF32 on, as people train on Ampere and later
            try:
                measure_cell(run, plan.dn121, plan.img_size, cell, plan.warmup, plan.steps, entry["rows"])
            finally:
                run.save()


def _goals_step_time(run: _Run, section: dict[str, Any]) -> None:
    memory = "peak" if run.device.type == "cuda" else "activation (meter)"
    for cell in section.get("data", {}).get("cells", []):
        rows = cell["rows"]
        eff = rows.get("efficient", {})
        ratio, less = eff.get("step_vs_tv"), eff.get("memory_x_less_vs_tv")
        if "tv" in rows and "efficient" in rows and "timm-ckpt" in rows:
            passed = None if ratio is None or less is None else ratio <= GOAL_STEP_RATIO and less >= GOAL_MEMORY_X
            section["goals"].append(_goal(
                f"[{cell['label']}] efficient within {GOAL_STEP_RATIO:.2f}x of torchvision plain's step time at >= "
                f"{GOAL_MEMORY_X:g}x less {memory} memory", passed,
                f"{_f(ratio, '.2f', 'x')} step, {_f(less, '.2f', 'x')} less memory"))
        compiled = [rows[c] for c in COMPILED if rows.get(c, {}).get("step_vs_tv") is not None]
        if any(c in rows for c in COMPILED):
            best = min(compiled, key=lambda r: r["step_vs_tv"]) if compiled else None
            section["goals"].append(_goal(
                f"[{cell['label']}] best compiled efficient path faster than torchvision plain eager",
                None if best is None else best["step_vs_tv"] < 1.0,
                "no compiled path finished" if best is None else f"{best['variant']}: {best['step_vs_tv']:.2f}x"))


def _goal(text: str, passed: bool | None, detail: str) -> dict[str, Any]:
    return {"goal": text, "passed": passed, "detail": detail}


# --- searches: max batch and depth ---

class _Bounds:
    """Wraps a ``fits`` predicate over units, remembering the largest success and smallest failure (for a search
    cut short) and the number of probes."""

    def __init__(self, fits: Callable[[int], bool], unit: int, run: _Run) -> None:
        self.fits, self.unit, self.run = fits, unit, run
        self.good: int | None = None
        self.bad: int | None = None
        self.probes = 0

    def __call__(self, n: int) -> bool:
        self.run.check_time()
        self.probes += 1
        ok = self.fits(n * self.unit)
        if ok:
            self.good = max(self.good or 0, n * self.unit)
        else:
            self.bad = n * self.unit if self.bad is None else min(self.bad, n * self.unit)
        return ok


def search(run: _Run, fits: Callable[[int], bool], start: int, limit: int, unit: int,
           entry: dict[str, Any]) -> None:
    """Largest value in multiples of ``unit`` for which ``fits`` holds (doubling, then bisection), into ``entry``;
    on running out of time ``entry`` keeps the bounds found so far and the exception propagates."""
    bounds = _Bounds(fits, unit, run)
    try:
        entry["value"] = largest_batch(bounds, max(start // unit, 1), max(limit // unit, 1)) * unit
        entry["status"] = "ok"
        entry["hit_limit"] = entry["value"] >= (limit // unit) * unit
    except OutOfTime:
        entry.update(status="out of time", value=bounds.good, lower_bound=True)
        raise
    except Exception as error:
        entry.update(status="failed", error=one_line(error), value=bounds.good)
    finally:
        entry.update(probes=bounds.probes, first_failure=bounds.bad)


@contextlib.contextmanager
def _memory_cap(run: _Run, cap: Cap) -> Iterator[None]:
    """On a GPU, limit this process's allocator to ``cap`` (a fraction of the device) for the block."""
    if run.device.type != "cuda":
        yield
        return
    _release(run.device)
    total = torch.cuda.get_device_properties(run.device).total_memory
    fraction = 1.0 if cap.bytes is None else min(cap.bytes / total, 1.0)
    torch.cuda.set_per_process_memory_fraction(fraction, run.device)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, run.device)


def _probe(build: Callable[[], nn.Module], spec: ModelSpec, batch: int, img: int, amp: str | None,
           channels_last: bool, device: torch.device, meter_cap: int | None) -> bool:
    # A function of its own, so its tensors and graph die with its frame when it raises.
    model = build()
    x, y = _batch(spec, batch, img, device, channels_last)
    if meter_cap is not None:  # smoke: a byte budget on the deterministic meter stands in for GPU memory
        with SavedTensorMeter(exclude=model) as meter:
            _loss(model, x, y, amp)  # the forward alone: the meter has counted all it needs
        return meter.bytes <= meter_cap
    _step(model, x, y, amp)
    _sync(device)
    return True


def make_fits(run: _Run, build: Callable[[], nn.Module], spec: ModelSpec, img: int, amp: str | None,
              channels_last: bool, cap: Cap) -> Callable[[int], bool]:
    """Does one training step at this batch fit? On a GPU: it runs without running out of memory under the cap
    (any other error propagates); in smoke runs: the meter's saved bytes stay within the cap's byte budget."""
    meter_cap = cap.bytes if run.device.type != "cuda" else None

    def fits(batch: int) -> bool:
        try:
            return _probe(build, spec, batch, img, amp, channels_last, run.device, meter_cap)
        except Exception as error:
            if not is_oom(error):
                raise
            return False
        finally:  # runs once the exception, and the frames holding the probe's tensors, are gone
            if run.device.type == "cuda":
                torch.cuda.empty_cache()  # a full gc per probe would cost more than the probe; OOMs get one below

    def fits_and_collect(batch: int) -> bool:
        ok = fits(batch)
        if not ok:
            _release(run.device)
        return ok

    return fits_and_collect

    return fits


def _resident(run: _Run, name: str, spec: ModelSpec, channels_last: bool) -> Callable[[], nn.Module]:
    """A builder returning one model kept across probes (its gradients are freed by each step's zero_grad)."""
    torch.manual_seed(0)
    state = spec.build("plain").state_dict()
    model = _prepare(run, name, spec, state, channels_last)

    def build() -> nn.Module:
        model.zero_grad(set_to_none=True)
        return model

    return build


def _section_max_batch(run: _Run, section: dict[str, Any]) -> None:
    plan = run.plan
    results = section["data"].setdefault("searches", [])
    for cap in plan.caps:
        for name in ("plain", "efficient", "frugal", "tv-me"):
            run.check_time()
            entry = {"cap": cap.label, "variant": name, "label": VARIANTS[name]}
            results.append(entry)
            run.log(f"[max-batch] {cap.label}: {name}")
            try:
                with _memory_cap(run, cap):
                    build = _resident(run, name, plan.dn121, True)
                    fits = make_fits(run, build, plan.dn121, plan.img_size, "bf16", True, cap)
                    search(run, fits, plan.batch_start, plan.batch_limit, plan.batch_unit, entry)
            finally:
                build = fits = None
                run.save()


def _goals_max_batch(run: _Run, section: dict[str, Any]) -> None:
    searches = section.get("data", {}).get("searches", [])
    for cap in run.plan.caps:
        found = {e["variant"]: e.get("value") for e in searches if e["cap"] == cap.label}
        for name, want in GOAL_BATCH_X.items():
            if name not in found:
                continue
            x = ratio(found.get(name), found.get("plain"))
            section["goals"].append(_goal(f"[{cap.label}] {name} max batch >= {want:g}x plain's",
                                          None if x is None else x >= want, f"{_f(x, '.2f', 'x')}"))


# --- section 3: the seed's setting ---

def _section_seed(run: _Run, section: dict[str, Any]) -> None:
    plan, data = run.plan, section["data"]
    cell = Cell(plan.seed_batch, None, False, ("plain", "efficient", "frugal"))
    data.update(model=plan.seed_spec.describe(), batch=plan.seed_batch, img_size=plan.seed_img, rows={},
                seed_table={k: {"forward_ms": f, "backward_ms": b, "ratio_b_f": b / f} for k, (f, b) in
                            SEED_TIMES.items()}, seed_max_batch=SEED_MAX_BATCH, searches=[])
    with _tf32(False):  # the seed's 1080 Ti had no TF32: plain fp32 arithmetic
        try:
            measure_cell(run, plan.seed_spec, plan.seed_img, cell, plan.warmup, plan.steps, data["rows"])
        finally:
            run.save()
        cap = plan.seed_cap or plan.cap
        for name in ("plain", "efficient"):
            run.check_time()
            entry = {"cap": cap.label, "variant": name}
            data["searches"].append(entry)
            try:
                with _memory_cap(run, cap):
                    build = _resident(run, name, plan.seed_spec, False)
                    fits = make_fits(run, build, plan.seed_spec, plan.seed_img, None, False, cap)
                    search(run, fits, plan.seed_batch, plan.batch_limit, plan.batch_unit, entry)
            finally:
                build = fits = None
                run.save()


# --- section 4: depth at a fixed budget ---

def depth_spec(plan: Plan, layers_per_block: int) -> ModelSpec:
    return _bc_spec((layers_per_block,) * 3, plan.depth_growth, f"DenseNet-BC k={plan.depth_growth}")


def _section_depth(run: _Run, section: dict[str, Any]) -> None:
    plan, cap = run.plan, run.plan.cap
    results = section["data"].setdefault("searches", [])
    for mode in ("plain", "efficient", "frugal"):
        run.check_time()
        entry = {"cap": cap.label, "variant": mode}
        results.append(entry)
        run.log(f"[depth] {cap.label}: {mode}")

        def fits(layers: int, mode: str = mode) -> bool:
            spec = depth_spec(plan, layers)

            def build() -> nn.Module:
                torch.manual_seed(0)
                with torch.device(run.device):  # initialise on the device: deep nets build much faster there
                    return spec.build(mode).train()

            return make_fits(run, build, spec, plan.depth_img, None, False, cap)(plan.depth_batch)

        try:
            with _memory_cap(run, cap):
                search(run, fits, plan.depth_start, plan.depth_limit, 1, entry)
        finally:
            if entry.get("value"):
                entry["layers_per_block"] = entry["value"]
                entry["depth"] = depth_spec(plan, entry["value"]).depth
            run.save()


def _goals_depth(run: _Run, section: dict[str, Any]) -> None:
    for entry in section.get("data", {}).get("searches", []):
        if entry["variant"] == "frugal":
            depth = entry.get("depth")
            passed = None if depth is None else depth >= GOAL_FRUGAL_DEPTH
            if entry.get("status") != "ok" and not passed:
                passed = None  # a search cut short proves nothing against the goal
            section["goals"].append(_goal(f"[{entry['cap']}] frugal trains >= {GOAL_FRUGAL_DEPTH} layers",
                                          passed, f"{depth or '-'} layers"
                                          + (" (lower bound: search cut short)" if entry.get("lower_bound") else "")))


# --- section 5: host-bound check ---

def busy_time(intervals: Sequence[tuple[float, float]]) -> float:
    """Length of the union of ``(start, end)`` intervals: time during which at least one of them runs (kernels on
    several streams, or nested CPU ops, are counted once)."""
    total, current_start, current_end = 0.0, None, None
    for start, end in sorted(intervals):
        if current_end is None or start > current_end:
            if current_end is not None:
                total += current_end - current_start
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    if current_end is not None:
        total += current_end - current_start
    return total


def _best_compiled(run: _Run) -> str:
    """The compiled path that was fastest in the first step-time cell, else regional compile."""
    cells = run.report["sections"].get("step-time", {}).get("data", {}).get("cells", [])
    rows = cells[0]["rows"] if cells else {}
    timed = [rows[c] for c in COMPILED if rows.get(c, {}).get("step_ms") is not None]
    return min(timed, key=lambda r: r["step_ms"])["variant"] if timed else COMPILED[0]


def _section_host_bound(run: _Run, section: dict[str, Any]) -> None:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    plan, device = run.plan, run.device
    cell = plan.cells[0]
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    kind = DeviceType.CUDA if cuda else DeviceType.CPU
    rows = section["data"].setdefault("rows", [])
    section["data"].update(setting=cell.label, busy="CUDA kernels" if cuda else "CPU ops (profiler, CPU activity)")
    torch.manual_seed(0)
    state = plan.dn121.build("plain").state_dict()
    x, y = _batch(plan.dn121, cell.batch, plan.img_size, device, cell.channels_last)
    for name in ("efficient", _best_compiled(run)):
        run.check_time()
        row = {"variant": name, "label": VARIANTS[name]}
        rows.append(row)
        try:
            model = _prepare(run, name, plan.dn121, state, cell.channels_last)
            for _ in range(max(plan.warmup, 2)):
                _step(model, x, y, cell.amp)
            _sync(device)
            run.check_time()
            with profile(activities=activities) as prof:
                t0 = time.perf_counter()
                for _ in range(plan.profile_steps):
                    _step(model, x, y, cell.amp)
                _sync(device)
                wall_us = (time.perf_counter() - t0) * 1e6
            intervals = [(e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == kind]
            busy_us = busy_time(intervals)
            row.update(steps=plan.profile_steps, step_wall_ms=wall_us / plan.profile_steps / 1e3,
                       busy_ms=busy_us / plan.profile_steps / 1e3, events=len(intervals),
                       idle_fraction=max(0.0, 1.0 - busy_us / wall_us) if wall_us else None)
            if cuda:
                row["kernel_sum_ms"] = sum(b - a for a, b in intervals) / plan.profile_steps / 1e3
        except OutOfTime:
            raise
        except Exception as error:
            row.update(status="failed", error=one_line(error))
        finally:
            model = None
            _release(device)
            run.save()


# --- section 6: correctness on the device ---

def _repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


def _correctness_commands(plan: Plan) -> list[tuple[str, list[str]]]:
    root = _repo_root()
    tool = root / "tools" / "gradcheck.py"
    gradcheck = [sys.executable, str(tool)] if tool.is_file() else [sys.executable, "-m", "effidense", "gradcheck"]
    return [("gradcheck", gradcheck + list(plan.gradcheck_args)),
            ("pytest -m cuda", [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider",
                                str(root / "tests")])]


def _section_correctness(run: _Run, section: dict[str, Any]) -> None:
    root = _repo_root()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
    results = section["data"].setdefault("checks", [])
    for name, command in _correctness_commands(run.plan):
        run.check_time()
        entry: dict[str, Any] = {"check": name, "command": " ".join(command)}
        results.append(entry)
        if name.startswith("pytest") and not (root / "tests").is_dir():
            entry.update(status="skipped", passed=None, last_line="no tests/ directory beside the package")
            continue
        run.log(f"[correctness] {name}")
        start = time.monotonic()
        try:
            done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True,
                                  timeout=max(run.remaining(), 1.0))
            output = done.stdout + done.stderr
            entry.update(status="ran", rc=done.returncode, passed=done.returncode == 0)
        except subprocess.TimeoutExpired as error:
            output = _text(error.stdout) + _text(error.stderr)
            entry.update(status="out of time", rc=None, passed=None)
        entry["seconds"] = round(time.monotonic() - start, 1)
        lines = [line for line in output.splitlines() if line.strip()]
        entry["last_line"] = lines[-1].strip() if lines else ""
        entry["tail"] = lines[-15:]
        log_name = name.replace(" ", "_").replace("-", "") + ".log"
        atomic_write_bytes(run.out_dir / log_name, output.encode())
        entry["log"] = log_name
        run.save()
        if entry["status"] == "out of time":
            raise OutOfTime(f"{name} did not finish in the time left")


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


_SECTION_RUNNERS: dict[str, Callable[[_Run, dict[str, Any]], None]] = {
    "step-time": _section_step_time,
    "max-batch": _section_max_batch,
    "seed": _section_seed,
    "depth": _section_depth,
    "host-bound": _section_host_bound,
    "correctness": _section_correctness,
}
_GOALS: dict[str, Callable[[_Run, dict[str, Any]], None]] = {
    "step-time": _goals_step_time, "max-batch": _goals_max_batch, "depth": _goals_depth,
}


# --- the markdown summary ---

def _f(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _mib(value: int | None) -> str:
    return _f(None if value is None else value / MiB, ".1f")


def _table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(columns)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    return lines + ["| " + " | ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) + " |" for r in rows]


def _timing_rows(rows: dict[str, dict[str, Any]], memory: str) -> tuple[list[str], list[list[str]]]:
    columns = ["variant", "step ms", "images/s", "step vs tv plain", f"{memory} MiB", "x less than tv plain",
               "compile s"]
    table = []
    for row in rows.values():
        if row.get("status") != "ok":
            table.append([row["variant"], f"FAILED: {row.get('error')}", "", "", "", "", ""])
            continue
        table.append([row["variant"], _f(row.get("step_ms"), ".1f"), _f(row.get("images_per_s"), ".0f"),
                      _f(row.get("step_vs_tv"), ".2f", "x"), _mib(_memory(row)),
                      _f(row.get("memory_x_less_vs_tv"), ".2f", "x"), _f(row.get("compile_s"), ".1f")])
    return columns, table


def _summary_step_time(data: dict[str, Any]) -> list[str]:
    memory = "peak" if data.get("memory", "").startswith("peak") else "activation"
    lines = []
    for cell in data.get("cells", []):
        lines += ["", f"**{cell['label']}**", ""] + _table(*_timing_rows(cell["rows"], memory))
    return lines


def _search_value(entry: dict[str, Any]) -> str:
    value = entry.get("value")
    text = "-" if value is None else str(value)
    if entry.get("lower_bound"):
        text = f">= {text} (cut short)"
    elif entry.get("hit_limit"):
        text = f">= {text} (search limit)"
    elif entry.get("status") == "failed":
        text = f"FAILED: {entry.get('error')}"
    return text


def _summary_max_batch(data: dict[str, Any]) -> list[str]:
    rows, plain = [], {}
    for e in data.get("searches", []):
        if e["variant"] == "plain":
            plain[e["cap"]] = e.get("value")
        x = ratio(e.get("value"), plain.get(e["cap"]))
        rows.append([e["cap"], e["variant"], _search_value(e), _f(x, ".2f", "x"), str(e.get("probes", "-"))])
    return ["", *_table(["cap", "variant", "max batch", "x plain", "probes"], rows)] if rows else []


def _summary_seed(data: dict[str, Any]) -> list[str]:
    lines = ["", f"{data.get('model', '')}, batch {data.get('batch')}, {data.get('img_size')} px, fp32 (TF32 off)", ""]
    rows = []
    for name, row in data.get("rows", {}).items():
        seed = data.get("seed_table", {}).get(name, {})
        if row.get("status") != "ok":
            rows.append([name, f"FAILED: {row.get('error')}", "", "", "", "", ""])
            continue
        rows.append([name, _f(row.get("forward_ms"), ".1f"), _f(row.get("backward_ms"), ".1f"),
                     _f(row.get("ratio_b_f"), ".2f"), _f(seed.get("forward_ms"), ".1f"),
                     _f(seed.get("backward_ms"), ".1f"), _f(seed.get("ratio_b_f"), ".2f")])
    if rows:
        lines += _table(["variant", "forward ms", "backward ms", "R=B/F", "seed F (1080 Ti)", "seed B", "seed R"],
                        rows)
    searches = data.get("searches", [])
    if searches:
        seed_batch = data.get("seed_max_batch", {})
        lines += [""] + _table(["cap", "variant", "max batch", "seed (1080 Ti, 11 GB)"],
                               [[e["cap"], e["variant"], _search_value(e), str(seed_batch.get(e["variant"], "-"))]
                                for e in searches])
    return lines


def _summary_depth(data: dict[str, Any]) -> list[str]:
    rows = [[e["cap"], e["variant"], _search_value(e), str(e.get("depth", "-")),
             str(PAPER_DEPTH.get(e["variant"], "-"))] for e in data.get("searches", [])]
    return ["", *_table(["cap", "variant", "layers per block", "depth (layers)", "paper (12 GB)"], rows)] if rows \
        else []


def _summary_host_bound(data: dict[str, Any]) -> list[str]:
    rows = []
    for r in data.get("rows", []):
        if r.get("status") == "failed":
            rows.append([r["variant"], f"FAILED: {r.get('error')}", "", "", ""])
            continue
        rows.append([r["variant"], _f(r.get("step_wall_ms"), ".1f"), _f(r.get("busy_ms"), ".1f"),
                     _f(r.get("kernel_sum_ms"), ".1f"), _f(r.get("idle_fraction"), ".1%")])
    head = f"{data.get('setting', '')}; busy = union of {data.get('busy', '')} intervals"
    return ["", head, "", *_table(["variant", "step wall ms", "busy ms", "kernel sum ms", "idle"], rows)] if rows \
        else []


def _summary_correctness(data: dict[str, Any]) -> list[str]:
    rows = []
    for e in data.get("checks", []):
        verdict = {True: "PASS", False: "FAIL", None: e.get("status", "-").upper()}[e.get("passed")]
        rows.append([e["check"], verdict, str(e.get("rc", "-")), _f(e.get("seconds"), ".1f"), e.get("last_line", "")])
    return ["", *_table(["check", "result", "rc", "s", "as printed (last line)"], rows)] if rows else []


_SUMMARIES: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "step-time": _summary_step_time, "max-batch": _summary_max_batch, "seed": _summary_seed,
    "depth": _summary_depth, "host-bound": _summary_host_bound, "correctness": _summary_correctness,
}


def format_summary(report: dict[str, Any]) -> str:
    """The markdown summary of a report (complete or partial)."""
    env = report["environment"]
    kind = "SMOKE RUN (CPU, tiny models: the figures test the code path, not the claims)" if report["smoke"] \
        else "GPU evidence run"
    lines = [f"# effidense {kind}", "",
             f"{env.get('device_name')}, torch {env.get('torch')}, CUDA {env.get('cuda', '-')}, "
             f"effidense {env.get('effidense')}, {env.get('date')}; "
             f"{'complete' if report['complete'] else 'INCOMPLETE (partial results)'}, "
             f"{report.get('elapsed_s', 0):.0f} s"]
    goals = []
    for i, (name, section) in enumerate(report["sections"].items(), 1):
        status = section["status"]
        timing = f", {section['seconds']:.0f} s of {section['budget_s']:.0f} s" if "seconds" in section else ""
        lines += ["", f"## {i}. {section['title']} [{name}]", "",
                  f"status: {status}{timing}" + (f" ({section['error']})" if section.get("error") else "")]
        lines += _SUMMARIES[name](section.get("data", {}))
        goals += section.get("goals", [])
    if goals:
        lines += ["", "## Goals", ""]
        for g in goals:
            verdict = {True: "PASS", False: "FAIL", None: "n/a "}[g["passed"]]
            lines.append(f"- {verdict} {g['goal']}: {g['detail']}")
    return "\n".join(lines)
