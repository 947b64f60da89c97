"""Output: the markdown table, the JSON document and the plot."""
from __future__ import annotations

import io
import json
from dataclasses import asdict
from typing import Any

from ..fileio import atomic_write_bytes
from ..memory import MiB
from ..modelspec import ModelSpec
from .config import JSON_SCHEMA, BenchReport
from .variants import COMPILE_SUFFIX

__all__ = ["format_table", "report_to_json", "write_json", "write_plot"]


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
