"""Output: the markdown table, the JSON document and the plot."""
from __future__ import annotations

import io
import json
from dataclasses import asdict
from typing import Any

from ..fileio import PLOT_FORMATS, atomic_write_bytes
from ..harness.variants import COMPILE_SUFFIX
from ..memory import MiB
from ..modelspec import ModelSpec
from .config import HOST_BATCH, HOST_REFERENCE, JSON_SCHEMA, BenchReport, host_img_size, size_label

__all__ = ["compile_verdicts", "fmt", "format_table", "report_to_json", "write_json", "write_plot"]


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    """A table cell: ``value`` in format ``spec`` with ``suffix``, or ``-`` when missing."""
    return "-" if value is None else f"{value:{spec}}{suffix}"


def format_table(report: BenchReport) -> str:
    """The markdown table printed on stdout, preceded by a header naming model, settings and machine."""
    cfg, env = report.config, report.environment
    cuda = cfg.device == "cuda"
    show_compile = any(r.variant.endswith(COMPILE_SUFFIX) for r in report.results)
    columns = ["variant", "forward ms", "backward ms", "R=B/F", "step ms", "step vs plain", "images/s",
               "activation MiB", "x less", "host ms", f"host vs {report.host_reference or 'ref'}"]
    if cuda:
        columns += ["peak MiB", "peak x less"]
    if show_compile:
        columns += ["vs eager", "compile s"]
    if cfg.max_batch:
        columns += ["max batch", "max batch x"]
    rows = []
    for r in report.results:
        if not r.ok:
            rows.append([r.variant, f"{r.status.upper()}: {r.error}"] + [""] * (len(columns) - 2))
            continue
        row = [r.variant, fmt(r.forward_ms, ".1f"), fmt(r.backward_ms, ".1f"), fmt(r.ratio_b_f, ".2f"),
               fmt(r.step_ms, ".1f"), fmt(r.step_vs_plain, ".2f", "x"), fmt(r.images_per_s, ".1f"),
               fmt(None if r.activation_bytes is None else r.activation_bytes / MiB, ".1f"),
               fmt(r.activation_x_less, ".2f", "x"), fmt(r.host_ms, ".1f"), fmt(r.host_vs_ref, ".2f", "x")]
        if cuda:
            row += [fmt(None if r.peak_bytes is None else r.peak_bytes / MiB, ".1f"),
                    fmt(r.peak_x_less, ".2f", "x")]
        if show_compile:
            row += [fmt(r.vs_eager, ".2f", "x"), fmt(r.compile_s, ".1f")]
        if cfg.max_batch:
            row += [fmt(r.max_batch, "d"), fmt(r.max_batch_x, ".2f", "x")]
        rows.append(row)
    # A failed row's message spans the table, so it does not set the width of the forward-time column.
    widths = [max([len(c)] + [len(row[i]) for row, r in zip(rows, report.results, strict=True)
                              if r.ok or i == 0]) for i, c in enumerate(columns)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) + " |" for row in rows]
    lines += ["", *compile_verdicts(report)] if show_compile else []
    per_rank = f" per rank, {report.world_size} DDP ranks (images/s is their total)" if report.world_size > 1 else ""
    header = [
        f"model: {cfg.spec.describe()}",
        (f"host-overhead step: batch {HOST_BATCH}, {size_label(cfg.spec, host_img_size(cfg.spec))}"
         if cfg.host_only else f"batch {cfg.batch_size}{per_rank}, {size_label(cfg.spec, cfg.img_size)}") +
        f", {cfg.amp or 'fp32'}"
        f"{', channels_last' if cfg.channels_last else ''}, {cfg.device} ({env.get('device_name')}), "
        f"median of {cfg.steps} round{'s' if cfg.steps != 1 else ''} after {cfg.warmup} warm-up"
        f"{', host-overhead steps only' if cfg.host_only else ''}",
        f"torch {env['torch']}, {env['cpu_count']} CPUs, {env['torch_threads']} threads, {env['date']}",
        "",
    ]
    if show_compile:
        header.insert(2, f"+compile: the whole model (torch.compile mode {cfg.compile_mode or 'default'!r}); "
                         "vs eager: its step over its eager self's, median of per-round ratios; compile s: its first "
                         "step less its median step, compiled cold (dynamo reset, inductor's on-disk caches off)")
    host_size = host_img_size(cfg.spec)
    notes = ["", "Variants take turns: each round times one step of every variant. x less: plain's activation (peak) "
             "memory divided by the variant's; step vs plain: median over rounds of the variant's step time divided by "
             "plain's in the same round; a step is forward + loss + backward.",
             f"host ms: one such step at batch {HOST_BATCH}, {size_label(cfg.spec, host_size)}, where "
             "arithmetic costs almost nothing (the host's overhead), timed in the same rounds; host vs "
             f"{report.host_reference or 'ref'}: median of per-round ratios"
             + (" (torchvision's DenseNet with memory_efficient=False)" if report.host_reference == HOST_REFERENCE
                else "")]
    if report.floor_bytes:
        plain = next((r for r in report.results if r.variant == "plain" and r.ok), None)
        versus = (f", {plain.activation_bytes / report.floor_bytes:.1f}x less than plain"
                  if plain and plain.activation_bytes else "")
        notes.append(f"floor: {report.floor_bytes / MiB:.1f} MiB (fp32 input + block inputs + every dense layer's new "
                     f"features, each kept once: the least without recomputing across layers{versus})")
    return "\n".join(header + lines + notes)


def compile_verdicts(report: BenchReport) -> list[str]:
    """One line per compiled variant that ran beside its eager self: whether compiling pays on this device, and
    after how long a compile."""
    cfg = report.config
    step = "host-overhead step" if cfg.host_only else "step"
    eager = {r.variant: r for r in report.results if r.ok}
    lines = []
    for r in report.results:
        if not r.ok or not r.variant.endswith(COMPILE_SUFFIX) or r.vs_eager is None:
            continue
        base = r.variant.removesuffix(COMPILE_SUFFIX)
        after = "" if r.compile_s is None else f" after a {_seconds(r.compile_s)} compile"
        # The partitioner decides what a compiled graph keeps: a mode may lose what it saves eagerly.
        kept, own = r.activation_bytes, getattr(eager.get(base), "activation_bytes", None)
        more = f"; but it keeps {kept / own:.1f}x the memory eager {base} keeps" if kept and own and kept > 1.1 * own \
            else ""
        if r.vs_eager >= 1:
            how = "no faster than" if r.vs_eager < 1.005 else f"{r.vs_eager:.2f}x slower than"
            lines.append(f"compiled {base} is {how} eager on {cfg.device} ({step}){after}{more}: don't compile on "
                         "this device")
        else:
            lines.append(f"compiled {base} is {1 / r.vs_eager:.2f}x faster than eager on {cfg.device} ({step})"
                         f"{after}{more}")
    return lines


def _seconds(s: float) -> str:
    return f"{s:.0f} s" if s >= 10 else f"{s:.1f} s"


def report_to_json(report: BenchReport) -> dict[str, Any]:
    """Every number of the run and its environment, JSON-serialisable."""
    cfg = report.config
    config = {k: v for k, v in asdict(cfg).items() if k not in ("spec", "progress", "traceback", "builders")}
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
        "host_reference": report.host_reference,
        "compile_verdicts": compile_verdicts(report),
        "host_input": {"batch_size": HOST_BATCH, "img_size": host_img_size(cfg.spec)},
    }


def write_json(path: str, report: BenchReport) -> None:
    atomic_write_bytes(path, (json.dumps(report_to_json(report), indent=2) + "\n").encode())


_STYLES = {"plain": ("tab:red", "o", "-"), "efficient": ("tab:blue", "s", "-"), "frugal": ("tab:green", "^", "-"),
           "tv": ("tab:purple", "D", "--"), "timm": ("tab:orange", "v", "--")}
_LABELS = {"tv": "torchvision memory_efficient", "timm": "timm grad checkpointing"}


def write_plot(path: str, report: BenchReport) -> None:
    """A figure (format by suffix: .png, .pdf or .svg): activation memory against depth for our modes and the
    torchvision/timm peers (left, where the run swept depths), median step time per variant with the min-max spread
    of the rounds (right)."""
    suffix = path[path.rfind("."):].lower() if "." in path else ""
    if suffix not in PLOT_FORMATS:
        raise ValueError(f"plot format must be one of {', '.join(PLOT_FORMATS)}, got {path!r}")
    import matplotlib  # the 'plot' extra; the command checks it is installed before running

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if report.depth_sweep:
        fig, (left, right) = plt.subplots(1, 2, figsize=(13, 6.4))
        _plot_depth(left, report)
    else:
        fig, right = plt.subplots(figsize=(6.5, 6.4))
    _plot_times(right, report)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format=suffix[1:], dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def _plot_depth(ax: Any, report: BenchReport) -> None:
    cfg, sweep = report.config, report.depth_sweep
    series = sweep["activation_bytes"]
    # The gap at the deepest point (how many times less than plain, and than each peer) goes into the legend, below
    # the axes: beside the curves it overlapped the peers' curves, inside the axes the legend overlaps plain's.
    deepest = {name: values[-1] for name, values in series.items() if values and values[-1]}
    for name, values in series.items():
        color, marker, line = _STYLES.get(name, (None, "x", ":"))
        points = [(d, v / MiB) for d, v in zip(sweep["depths"], values, strict=True) if v is not None]
        label = _LABELS.get(name, name)
        if name in ("efficient", "frugal") and name in deepest:
            gaps = [f"{deepest[ref] / deepest[name]:.1f}x less than {ref}" for ref in ("plain", "tv", "timm")
                    if ref in deepest]
            label += f": {', '.join(gaps)} at depth {sweep['depths'][-1]}" if gaps else ""
        ax.plot([d for d, _ in points], [v for _, v in points], marker=marker, linestyle=line, color=color,
                label=label)
    ax.set_xlabel("depth (layers)")
    ax.set_ylabel("activation memory saved for backward (MiB)")
    ax.set_title(f"Activation memory vs depth\n{_family_name(cfg.spec)}, batch {cfg.batch_size}, "
                 f"{size_label(cfg.spec, cfg.img_size)}, {cfg.amp or 'fp32'}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=1, frameon=False)
    skipped = sweep.get("skipped") or {}
    if skipped:
        ax.text(0.01, 0.99, "not shown: " + "; ".join(f"{v}" for v in skipped.values()), transform=ax.transAxes,
                fontsize=7, va="top", ha="left", wrap=True, color="0.35")


def _plot_times(ax: Any, report: BenchReport) -> None:
    """Stacked forward/backward medians with min-max whiskers of the step over rounds (host time with
    --host-only)."""
    cfg = report.config
    host = cfg.host_only
    ok = [r for r in report.results if r.ok and (r.host_ms if host else r.step_ms) is not None]
    positions = list(range(len(ok)))
    key = "host_ms" if host else "step_ms"
    medians = [r.host_ms if host else r.step_ms for r in ok]
    spreads = [r.samples.get(key) or [m] for r, m in zip(ok, medians, strict=True)]
    if host:
        ax.bar(positions, medians, color="tab:gray", label="host step (tiny input)")
    else:
        forward = [r.forward_ms for r in ok]
        backward = [r.backward_ms for r in ok]
        ax.bar(positions, forward, color="tab:gray", label="forward")
        ax.bar(positions, backward, bottom=forward, color="tab:orange", label="backward")
    # Whiskers: the fastest and slowest round around the median step (which need not be median forward + backward).
    low = [m - min(s) for m, s in zip(medians, spreads, strict=True)]
    high = [max(s) - m for m, s in zip(medians, spreads, strict=True)]
    ax.errorbar(positions, medians, yerr=[low, high], fmt="_", color="black", capsize=4, markersize=10,
                label=f"median and min-max of {cfg.steps} round{'s' if cfg.steps != 1 else ''}")
    for i, (m, s) in enumerate(zip(medians, spreads, strict=True)):
        ax.text(i, max(s), f"{m:.0f} ms" if m >= 10 else f"{m:.1f} ms", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(positions, [r.variant for r in ok], rotation=30, ha="right")
    ax.set_ylabel(f"{'host step at a tiny input' if host else 'training step'} (ms)")
    if ok:
        ax.set_ylim(top=1.15 * max(max(s) for s in spreads))
    what = f"Host time per step, batch {HOST_BATCH}" if host else f"Step time, batch {cfg.batch_size}"
    size = host_img_size(cfg.spec) if host else cfg.img_size
    ax.set_title(f"{what}, {size_label(cfg.spec, size)}, {cfg.spec.name}\n"
                 f"{report.environment.get('device_name')}, torch {report.environment['torch']}")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)


def _family_name(spec: ModelSpec) -> str:
    kind = "DenseNet-BC" if spec.bottleneck else "DenseNet"
    return f"{kind} k={spec.arg('growth_rate')}, {len(spec.block_config)} blocks"
