"""A plan as a markdown table, a JSON document (schema ``effidense.plan/1``, see docs/planner.md) and a plot."""
from __future__ import annotations

import datetime
import io
import json
import platform
from dataclasses import asdict
from typing import Any

import torch

from ..fileio import PLOT_FORMATS, atomic_write_bytes
from .budget import GiB, format_bytes
from .core import PlanReport, VariantPlan

__all__ = ["JSON_SCHEMA", "PLOT_FORMATS", "format_table", "format_check", "recommendation", "report_to_json",
           "write_json", "write_plot"]
MODES = ("plain", "efficient", "frugal")  # fastest first

JSON_SCHEMA = "effidense.plan/1"


def _size(size: list[int] | None) -> str:
    return "x".join(map(str, size or []))


def _max_batch(r: VariantPlan) -> str:
    if r.max_batch is None:
        return "-"
    return f">= {r.max_batch}" if r.max_batch_at_limit else str(r.max_batch)


def _device(cfg: dict[str, Any]) -> str:
    return f"cpu, {cfg['threads']} thread{'s' * (cfg['threads'] != 1)}" if cfg.get("device") == "cpu" else \
        cfg.get("device", "cuda")


def _setting(cfg: dict[str, Any]) -> str:
    return (f"{cfg['model']}, batch {cfg['batch_size']}, {_size(cfg['img_size'])}, "
            f"{cfg['amp'] + ' autocast' if cfg['amp'] else cfg['dtype']}, optimizer {cfg['optimizer']}, "
            f"on {_device(cfg)}")


def format_table(report: PlanReport) -> str:
    """Markdown: per variant, the predicted peak at the batch and what is live at that moment (the columns after
    the peak sum to it), and the predicted largest batch."""
    cfg = report.config
    edge = cfg["max_edge"]
    lines = [f"**Predicted** memory of one training step: {_setting(cfg)}"]
    if report.budget_bytes is not None:
        lines.append(f"Budget {format_bytes(report.budget_bytes)}, {format_bytes(report.usable_bytes)} usable after "
                     f"a {report.margin:.0%} safety margin.")
    lines.append("")
    columns = ["variant", "predicted peak", "= params+grads+optimizer", "+ batch and saved activations",
               "+ backward temporaries", "+ kernel scratch", "predicted max batch"]
    if edge:
        columns.append(f"predicted max cube edge at batch {cfg['batch_size']}")
    columns.append("max batch x plain")
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    plain = next((r for r in report.variants if r.name == "plain" and r.max_batch), None)
    for r in report.variants:
        if r.status in ("skipped", "failed"):
            lines.append(f"| {r.name} | {r.status}: {r.error} |" + " |" * (len(columns) - 2))
            continue
        at = r.at_peak or {}
        row = [r.name, format_bytes(r.peak_bytes),
               *(format_bytes(sum(at.get(k, 0) for k in kinds)) for kinds in _COLUMNS),
               "does not fit" if r.status == "does-not-fit" else _max_batch(r)]
        if edge:
            row.append("-" if r.max_edge is None else str(r.max_edge))
        row.append(f"{r.max_batch / plain.max_batch:.2f}x" if plain and r.max_batch else "-")
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Columns after the peak: what is live at that moment, summing to it (saved activations: those still "
                  "held; the "
                  f"kernel scratch counted on {cfg.get('device', 'cuda')}: {report.scratch}).",
              "Not counted (the safety margin is for these): " + "; ".join(report.not_counted) + "."]
    return "\n".join(lines)


# The at-peak kinds of each column after the peak, which sum to it
# (the batch is saved for backward by the first convolution: the meter counts it with the saved activations)
_COLUMNS = (("parameters", "gradients", "optimizer_state"), ("input", "saved_activations"), ("transient",),
            ("scratch",))


def format_check(report: PlanReport) -> str:
    """Markdown: per variant, the predicted peak at the batch against a real step's, measured by the allocator."""
    cfg = report.config
    meter = "torch.cuda.max_memory_allocated" if cfg.get("device") == "cuda" else \
        "the CPU allocator's events (torch.profiler)"
    lines = [f"**Check**: one real training step against the plan: {_setting(cfg)}. Measured by {meter}, plus "
             "what the step starts with (parameters, optimizer state, the batch).", "",
             "| variant | predicted peak | measured peak | predicted - measured |", "|---|---|---|---|"]
    for r in report.variants:
        if r.measured_error is None:
            lines.append(f"| {r.name} | {r.status}: {r.error} | | |")
            continue
        lines.append(f"| {r.name} | {format_bytes(r.peak_bytes)} | {format_bytes(r.measured_peak_bytes)} | "
                     f"{r.measured_error:+.2%} |")
    return "\n".join(lines)


def recommendation(report: PlanReport, model: str | None) -> str | None:
    """The last line of a plan with a budget: the fastest of our memory modes that fits the planned batch (the
    most frugal where none does), with its largest batch, as the command that trains it."""
    fits = {r.name: r for r in report.variants if r.name in MODES and r.ok and r.max_batch}
    if not fits:
        return None
    batch = report.config["batch_size"]
    chosen = next((fits[m] for m in MODES if m in fits and fits[m].max_batch >= batch),
                  max(fits.values(), key=lambda r: r.max_batch))
    flags = f"--memory {chosen.name} -b {chosen.max_batch}"
    size = report.config["img_size"]
    if model is None or len(set(size)) != 1:
        return f"Recommended: {flags} (predicted)"
    amp = {"bf16": " --amp --amp-dtype bfloat16", "fp16": " --amp"}.get(report.config["amp"] or "", "")
    return f"Recommended (predicted): effidense train --model {model} --img-size {size[0]} {flags}{amp}"

def report_to_json(report: PlanReport) -> dict[str, Any]:
    """The JSON document: ``{"schema", "predicted": true, "config", "budget_bytes", "usable_bytes", "margin",
    "not_counted", "environment", "variants": [{"name", "status", "peak_bytes", "max_batch", ...}]}``."""
    variants = []
    for r in report.variants:
        data = asdict(r)
        data["static_bytes"] = r.static_bytes
        data["transient_bytes"] = r.transient_bytes
        data["measured_error"] = r.measured_error
        variants.append(data)
    return {
        "schema": JSON_SCHEMA, "predicted": True, "config": report.config, "budget_bytes": report.budget_bytes,
        "usable_bytes": report.usable_bytes, "margin": report.margin, "not_counted": list(report.not_counted),
        "kernel_scratch": report.scratch,
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "date": datetime.date.today().isoformat()},
        "variants": variants,
    }


def write_json(path: str, report: PlanReport) -> None:
    atomic_write_bytes(path, (json.dumps(report_to_json(report), indent=2) + "\n").encode())


def write_plot(path: str, report: PlanReport) -> None:
    """Predicted peak against batch per variant (the fitted line, measured steps as dots), with the budget."""
    suffix = path[path.rfind("."):].lower() if "." in path else ""
    if suffix not in PLOT_FORMATS:
        raise ValueError(f"plot format must be one of {', '.join(PLOT_FORMATS)}, got {path!r}")
    import matplotlib  # the 'plot' extra; the command checks it is installed before running

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = report.config
    ok = [r for r in report.variants if r.bytes_per_sample is not None]
    largest = max([cfg["batch_size"] * 2, *(r.max_batch or 0 for r in ok)])
    top = int(largest * 1.15) + 1
    fig, ax = plt.subplots(figsize=(8, 5.2))
    for r in ok:
        line = ax.plot([0, top], [r.intercept_bytes / GiB, (r.intercept_bytes + r.bytes_per_sample * top) / GiB],
                       label=f"{r.name} (predicted max batch {_max_batch(r)})" if r.max_batch else r.name)
        same = [p for p in r.probes if p["size"] == cfg["img_size"]]
        ax.plot([p["batch"] for p in same], [p["peak_bytes"] / GiB for p in same], "o",
                color=line[0].get_color(), markersize=4)
    if report.budget_bytes is not None:
        ax.axhline(report.budget_bytes / GiB, color="black", linewidth=1, label="budget")
        ax.axhline(report.usable_bytes / GiB, color="black", linestyle="--", linewidth=1,
                   label=f"usable ({report.margin:.0%} safety margin)")
        ax.set_ylim(0, report.budget_bytes / GiB * 1.3)
    ax.set_xlim(0, top)
    ax.set_xlabel("batch size")
    ax.set_ylabel("predicted peak memory of a training step (GiB)")
    ax.set_title(f"Predicted peak vs batch: {cfg['model']}, {_size(cfg['img_size'])}, "
                 f"{cfg['amp'] + ' autocast' if cfg['amp'] else cfg['dtype']}, {cfg['optimizer']}\n"
                 "(dots: measured steps on fake tensors; not counted: CUDA context, workspaces, fragmentation)",
                 fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format=suffix[1:], dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
