"""The six sections and the goals they are judged by."""
from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..benchmark import fmt, ratio
from ..failures import is_oom, short_error
from ..fileio import atomic_write_bytes
from ..harness import Timer, largest_batch, load_weights, make_batch, release, step_loss, training_step
from ..memory import SavedTensorMeter, cuda_peak_bytes
from ..modelspec import ModelSpec
from .plan import (
    COMPILED,
    GOAL_BATCH_X,
    GOAL_FRUGAL_DEPTH,
    GOAL_MEMORY_X,
    GOAL_STEP_RATIO,
    GOAL_VOLUME_MEMORY_X,
    SEED_MAX_BATCH,
    SEED_TIMES,
    VARIANTS,
    Cap,
    Cell,
    OutOfTime,
    Plan,
    depth_spec,
    volume_settings,
    volume_spec,
)
from .prediction import goals_prediction, section_prediction
from .state import Run
from .steps import build_model, compile_variant, tf32
from .summary import row_memory

# --- section 1: step time ---

def _prepare(run: Run, name: str, spec: ModelSpec, state: dict[str, torch.Tensor], channels_last: bool,
             ) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(name, spec, run.plan.compile_options)
    load_weights(model, name, state)
    model.to(run.device).train()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return compile_variant(name, model, run.plan.compile_options)


def measure_cell(run: Run, spec: ModelSpec, img: int, cell: Cell, warmup: int, steps: int,
                 rows: dict[str, dict[str, Any]]) -> None:
    """Fill ``rows`` (variant -> numbers) for one setting: each variant is built with the same weights, warmed up
    (the first step compiles), measured for memory, then the variants take turns over ``steps`` timed rounds.
    On running out of time the rounds done so far are kept."""
    device = run.device
    torch.manual_seed(0)
    state = spec.build("plain").state_dict()
    x, y = make_batch(spec, cell.batch, img, device, cell.channels_last)
    models: dict[str, nn.Module] = {}
    try:
        for name in cell.variants:
            run.check_time()
            row = rows.setdefault(name, {"variant": name, "label": VARIANTS[name], "status": "ok"})
            try:
                model = _prepare(run, name, spec, state, cell.channels_last)
                first = None
                for i in range(max(warmup, 1)):
                    Timer(device).sync()
                    t0 = time.perf_counter()
                    training_step(model, x, y, cell.amp)
                    Timer(device).sync()
                    first = time.perf_counter() - t0 if i == 0 else first
                row["first_step_s"] = round(first, 3)
                if name not in COMPILED:  # the meter under compiled code would only recompile
                    model.zero_grad(set_to_none=True)
                    with SavedTensorMeter(exclude=model) as meter:
                        loss = step_loss(model, x, y, cell.amp)
                    del loss
                    row["activation_bytes"] = meter.bytes
                if device.type == "cuda":
                    model.zero_grad(set_to_none=True)
                    row["peak_bytes"] = cuda_peak_bytes(lambda m=model: training_step(m, x, y, cell.amp), device)
                model.zero_grad(set_to_none=True)
                models[name] = model
            except OutOfTime:
                raise
            except Exception as error:
                row.update(status="failed", error=short_error(error, kind=True))
                model = None
                release(device)
        samples: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
        try:
            for _ in range(steps):
                run.check_time()
                for name in list(models):
                    try:
                        step = training_step(models[name], x, y, cell.amp, timer=Timer(device))
                        samples[name].append((step.forward_ms, step.backward_ms))
                    except Exception as error:
                        rows[name].update(status="failed", error=short_error(error, kind=True))
                        del models[name]
                        release(device)
        finally:
            _finish_rows(rows, samples, cell.batch)
    finally:
        models.clear()
        release(device)


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
    for reference, key in (("tv-plain", "vs_tv_plain"), ("plain", "vs_plain"), ("monai", "vs_monai")):
        ref = rows.get(reference)
        if not ref or ref.get("step_ms") is None:
            continue
        for row in rows.values():
            if row.get("step_ms") is None:
                continue
            paired = [a / b for a, b in zip(row["step_samples_ms"], ref["step_samples_ms"], strict=False) if b]
            row[f"step_{key}"] = statistics.median(paired) if paired else ratio(row["step_ms"], ref["step_ms"])
            row[f"memory_x_less_{key}"] = ratio(row_memory(ref), row_memory(row))


def _section_step_time(run: Run, section: dict[str, Any]) -> None:
    plan = run.plan
    cells = section["data"].setdefault("cells", [])
    section["data"]["memory"] = "peak CUDA bytes" if run.device.type == "cuda" else "meter activation bytes"
    for i, cell in enumerate(plan.cells):
        run.check_time()
        entry = {"label": cell.label, "batch": cell.batch, "amp": cell.amp, "channels_last": cell.channels_last,
                 "rows": {}}
        cells.append(entry)
        run.log(f"[step-time] cell {i + 1}/{len(plan.cells)}: {cell.label}")
        with tf32(cell.amp is None):  # fp32 means TF32 on, as people train on Ampere and later
            try:
                measure_cell(run, plan.dn121, plan.img_size, cell, plan.warmup, plan.steps, entry["rows"])
            finally:
                run.save()


def _goals_step_time(run: Run, section: dict[str, Any]) -> None:
    memory = "peak" if run.device.type == "cuda" else "activation (meter)"
    for cell in section.get("data", {}).get("cells", []):
        rows = cell["rows"]
        eff = rows.get("efficient", {})
        ratio, less = eff.get("step_vs_tv_plain"), eff.get("memory_x_less_vs_tv_plain")
        if "tv-plain" in rows and "efficient" in rows and "timm" in rows:
            passed = None if ratio is None or less is None else ratio <= GOAL_STEP_RATIO and less >= GOAL_MEMORY_X
            section["goals"].append(goal(
                f"[{cell['label']}] efficient within {GOAL_STEP_RATIO:.2f}x of torchvision plain's step time at >= "
                f"{GOAL_MEMORY_X:g}x less {memory} memory", passed,
                f"{fmt(ratio, '.2f', 'x')} step, {fmt(less, '.2f', 'x')} less memory"))
        compiled = [rows[c] for c in COMPILED if rows.get(c, {}).get("step_vs_tv_plain") is not None]
        if any(c in rows for c in COMPILED):
            best = min(compiled, key=lambda r: r["step_vs_tv_plain"]) if compiled else None
            section["goals"].append(goal(
                f"[{cell['label']}] best compiled efficient path faster than torchvision plain eager",
                None if best is None else best["step_vs_tv_plain"] < 1.0,
                "no compiled path finished" if best is None else f"{best['variant']}: {best['step_vs_tv_plain']:.2f}x"))


def _section_volumes(run: Run, section: dict[str, Any]) -> None:
    """MONAI's DenseNet121 and our modes on volumes, the same weights, taking turns (as step-time's cells)."""
    plan, spec = run.plan, volume_spec(run.plan)
    cells = section["data"].setdefault("cells", [])
    section["data"]["memory"] = "peak CUDA bytes" if run.device.type == "cuda" else "meter activation bytes"
    for edge, cell in volume_settings(plan):
        run.check_time()
        label = f"{edge}^3, {cell.label}"
        entry = {"label": label, "edge": edge, "batch": cell.batch, "amp": cell.amp, "rows": {}}
        cells.append(entry)
        run.log(f"[3d] {label}")
        measure_cell(run, spec, edge, cell, plan.warmup, plan.steps, entry["rows"])


def _goals_volumes(run: Run, section: dict[str, Any]) -> None:
    for cell in section.get("data", {}).get("cells", []):
        less = cell["rows"].get("efficient", {}).get("memory_x_less_vs_monai")
        section["goals"].append(goal(
            f"[{cell['label']}] efficient keeps >= {GOAL_VOLUME_MEMORY_X:g}x less memory than MONAI's DenseNet121",
            None if less is None else less >= GOAL_VOLUME_MEMORY_X, fmt(less, ".2f", "x")))


def goal(text: str, passed: bool | None, detail: str) -> dict[str, Any]:
    return {"goal": text, "passed": passed, "detail": detail}


# --- searches: max batch and depth ---

class _Bounds:
    """Wraps a ``fits`` predicate over units, remembering the largest success and smallest failure (for a search
    cut short) and the number of probes."""

    def __init__(self, fits: Callable[[int], bool], unit: int, run: Run) -> None:
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


def search(run: Run, fits: Callable[[int], bool], start: int, limit: int, unit: int,
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
        entry.update(status="failed", error=short_error(error, kind=True), value=bounds.good)
    finally:
        entry.update(probes=bounds.probes, first_failure=bounds.bad)


@contextlib.contextmanager
def _memory_cap(run: Run, cap: Cap) -> Iterator[None]:
    """On a GPU, limit this process's allocator to ``cap`` (a fraction of the device) for the block."""
    if run.device.type != "cuda":
        yield
        return
    release(run.device)
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
    x, y = make_batch(spec, batch, img, device, channels_last)
    if meter_cap is not None:  # smoke: a byte budget on the deterministic meter stands in for GPU memory
        with SavedTensorMeter(exclude=model) as meter:
            step_loss(model, x, y, amp)  # the forward alone: the meter has counted all it needs
        return meter.bytes <= meter_cap
    training_step(model, x, y, amp)
    Timer(device).sync()
    return True


def make_fits(run: Run, build: Callable[[], nn.Module], spec: ModelSpec, img: int, amp: str | None,
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
            release(run.device)
        return ok

    return fits_and_collect

    return fits


def _resident(run: Run, name: str, spec: ModelSpec, channels_last: bool) -> Callable[[], nn.Module]:
    """A builder returning one model kept across probes (its gradients are freed by each step's zero_grad)."""
    torch.manual_seed(0)
    state = spec.build("plain").state_dict()
    model = _prepare(run, name, spec, state, channels_last)

    def build() -> nn.Module:
        model.zero_grad(set_to_none=True)
        return model

    return build


def _section_max_batch(run: Run, section: dict[str, Any]) -> None:
    plan = run.plan
    results = section["data"].setdefault("searches", [])
    for cap in plan.caps:
        for name in ("plain", "efficient", "frugal", "tv"):
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


def _goals_max_batch(run: Run, section: dict[str, Any]) -> None:
    searches = section.get("data", {}).get("searches", [])
    for cap in run.plan.caps:
        found = {e["variant"]: e.get("value") for e in searches if e["cap"] == cap.label}
        for name, want in GOAL_BATCH_X.items():
            if name not in found:
                continue
            x = ratio(found.get(name), found.get("plain"))
            section["goals"].append(goal(f"[{cap.label}] {name} max batch >= {want:g}x plain's",
                                          None if x is None else x >= want, f"{fmt(x, '.2f', 'x')}"))


# --- section 3: the seed's setting ---

def _section_seed(run: Run, section: dict[str, Any]) -> None:
    plan, data = run.plan, section["data"]
    cell = Cell(plan.seed_batch, None, False, ("plain", "efficient", "frugal"))
    data.update(model=plan.seed_spec.describe(), batch=plan.seed_batch, img_size=plan.seed_img, rows={},
                seed_table={k: {"forward_ms": f, "backward_ms": b, "ratio_b_f": b / f} for k, (f, b) in
                            SEED_TIMES.items()}, seed_max_batch=SEED_MAX_BATCH, searches=[])
    with tf32(False):  # the seed's 1080 Ti had no TF32: plain fp32 arithmetic
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

def _section_depth(run: Run, section: dict[str, Any]) -> None:
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


def _goals_depth(run: Run, section: dict[str, Any]) -> None:
    for entry in section.get("data", {}).get("searches", []):
        if entry["variant"] == "frugal":
            depth = entry.get("depth")
            passed = None if depth is None else depth >= GOAL_FRUGAL_DEPTH
            if entry.get("status") != "ok" and not passed:
                passed = None  # a search cut short proves nothing against the goal
            section["goals"].append(goal(f"[{entry['cap']}] frugal trains >= {GOAL_FRUGAL_DEPTH} layers",
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


def _best_compiled(run: Run) -> str:
    """The compiled path that was fastest in the first step-time cell, else the first."""
    cells = run.report["sections"].get("step-time", {}).get("data", {}).get("cells", [])
    rows = cells[0]["rows"] if cells else {}
    timed = [rows[c] for c in COMPILED if rows.get(c, {}).get("step_ms") is not None]
    return min(timed, key=lambda r: r["step_ms"])["variant"] if timed else COMPILED[0]


def _section_host_bound(run: Run, section: dict[str, Any]) -> None:
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
    x, y = make_batch(plan.dn121, cell.batch, plan.img_size, device, cell.channels_last)
    for name in ("efficient", _best_compiled(run)):
        run.check_time()
        row = {"variant": name, "label": VARIANTS[name]}
        rows.append(row)
        try:
            model = _prepare(run, name, plan.dn121, state, cell.channels_last)
            for _ in range(max(plan.warmup, 2)):
                training_step(model, x, y, cell.amp)
            Timer(device).sync()
            run.check_time()
            with profile(activities=activities) as prof:
                t0 = time.perf_counter()
                for _ in range(plan.profile_steps):
                    training_step(model, x, y, cell.amp)
                Timer(device).sync()
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
            row.update(status="failed", error=short_error(error, kind=True))
        finally:
            model = None
            release(device)
            run.save()


# --- section 6: correctness on the device ---

def _repo_root() -> Path:
    return Path(__file__).resolve().parents[2]  # effidense/gpu_report/sections.py -> the checkout


def _correctness_commands(plan: Plan) -> list[tuple[str, list[str]]]:
    root = _repo_root()
    tool = root / "tools" / "gradcheck.py"
    gradcheck = [sys.executable, str(tool)] if tool.is_file() else [sys.executable, "-m", "effidense", "gradcheck"]
    return [("gradcheck", gradcheck + list(plan.gradcheck_args)),
            ("pytest -m cuda", [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider",
                                str(root / "tests")])]


def _section_correctness(run: Run, section: dict[str, Any]) -> None:
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


SECTION_RUNNERS: dict[str, Callable[[Run, dict[str, Any]], None]] = {
    "step-time": _section_step_time,
    "max-batch": _section_max_batch,
    "seed": _section_seed,
    "depth": _section_depth,
    "host-bound": _section_host_bound,
    "prediction": section_prediction,
    "3d": _section_volumes,
    "correctness": _section_correctness,
}
GOALS: dict[str, Callable[[Run, dict[str, Any]], None]] = {
    "step-time": _goals_step_time, "max-batch": _goals_max_batch, "depth": _goals_depth,
    "prediction": goals_prediction, "3d": _goals_volumes,
}
