"""The markdown summary of a report."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ..benchmark import (
    fmt,
    ratio,
)
from ..memory import MiB
from .plan import PAPER_DEPTH

__all__ = ["format_summary", "row_memory"]


def row_memory(row: dict[str, Any]) -> int | None:
    """Peak bytes on a GPU; the meter's activation bytes on the CPU (smoke runs); compiled rows have no meter count
    of their own, so they show None there."""
    return row.get("peak_bytes", row.get("activation_bytes"))


def _mib(value: int | None) -> str:
    return fmt(None if value is None else value / MiB, ".1f")


def _table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(columns)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    return lines + ["| " + " | ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) + " |" for r in rows]


def _timing_rows(rows: dict[str, dict[str, Any]], memory: str, reference: str = "tv_plain",
                 shown: str = "tv plain") -> tuple[list[str], list[list[str]]]:
    columns = ["variant", "step ms", "images/s", f"step vs {shown}", f"{memory} MiB", f"x less than {shown}",
               "compile s"]
    table = []
    for row in rows.values():
        if row.get("status") != "ok":
            table.append([row["variant"], f"FAILED: {row.get('error')}", "", "", "", "", ""])
            continue
        table.append([row["variant"], fmt(row.get("step_ms"), ".1f"), fmt(row.get("images_per_s"), ".0f"),
                      fmt(row.get(f"step_vs_{reference}"), ".2f", "x"), _mib(row_memory(row)),
                      fmt(row.get(f"memory_x_less_vs_{reference}"), ".2f", "x"), fmt(row.get("compile_s"), ".1f")])
    return columns, table


def _summary_step_time(data: dict[str, Any]) -> list[str]:
    memory = "peak" if data.get("memory", "").startswith("peak") else "activation"
    lines = []
    for cell in data.get("cells", []):
        lines += ["", f"**{cell['label']}**", ""] + _table(*_timing_rows(cell["rows"], memory))
    return lines


def _summary_volumes(data: dict[str, Any]) -> list[str]:
    memory = "peak" if data.get("memory", "").startswith("peak") else "activation"
    lines = []
    for cell in data.get("cells", []):
        lines += ["", f"**{cell['label']}**", ""] + _table(*_timing_rows(cell["rows"], memory, "monai", "MONAI"))
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
        rows.append([e["cap"], e["variant"], _search_value(e), fmt(x, ".2f", "x"), str(e.get("probes", "-"))])
    return ["", *_table(["cap", "variant", "max batch", "x plain", "probes"], rows)] if rows else []


def _summary_seed(data: dict[str, Any]) -> list[str]:
    lines = ["", f"{data.get('model', '')}, batch {data.get('batch')}, {data.get('img_size')} px, fp32 (TF32 off)", ""]
    rows = []
    for name, row in data.get("rows", {}).items():
        seed = data.get("seed_table", {}).get(name, {})
        if row.get("status") != "ok":
            rows.append([name, f"FAILED: {row.get('error')}", "", "", "", "", ""])
            continue
        rows.append([name, fmt(row.get("forward_ms"), ".1f"), fmt(row.get("backward_ms"), ".1f"),
                     fmt(row.get("ratio_b_f"), ".2f"), fmt(seed.get("forward_ms"), ".1f"),
                     fmt(seed.get("backward_ms"), ".1f"), fmt(seed.get("ratio_b_f"), ".2f")])
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
        rows.append([r["variant"], fmt(r.get("step_wall_ms"), ".1f"), fmt(r.get("busy_ms"), ".1f"),
                     fmt(r.get("kernel_sum_ms"), ".1f"), fmt(r.get("idle_fraction"), ".1%")])
    head = f"{data.get('setting', '')}; busy = union of {data.get('busy', '')} intervals"
    return ["", head, "", *_table(["variant", "step wall ms", "busy ms", "kernel sum ms", "idle"], rows)] if rows \
        else []


def _summary_correctness(data: dict[str, Any]) -> list[str]:
    rows = []
    for e in data.get("checks", []):
        verdict = {True: "PASS", False: "FAIL", None: e.get("status", "-").upper()}[e.get("passed")]
        rows.append([e["check"], verdict, str(e.get("rc", "-")), fmt(e.get("seconds"), ".1f"), e.get("last_line", "")])
    return ["", *_table(["check", "result", "rc", "s", "as printed (last line)"], rows)] if rows else []


def _summary_prediction(data: dict[str, Any]) -> list[str]:
    lines = ["", f"Every 'predicted' figure is the planner's ({data.get('setting', '')}).", "",
             "| variant | batch | predicted peak MiB | measured peak MiB | error | predicted max batch | "
             "measured max batch |", "|---|---|---|---|---|---|---|"]
    for row in data.get("rows", []):
        if row.get("status") != "ok":
            lines.append(f"| {row['variant']} | FAILED: {row.get('error')} | | | | | |")
            continue
        for p in row["points"]:
            lines.append(f"| {row['variant']} | {p['batch']} | {p['predicted_bytes'] / 2**20:.1f} | "
                         f"{p['measured_bytes'] / 2**20:.1f} | {p['rel_error']:+.1%} | "
                         f"{row.get('predicted_max_batch') or '-'} | {row.get('measured_max_batch') or '-'} |")
    return lines


_SUMMARIES: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "step-time": _summary_step_time, "max-batch": _summary_max_batch, "seed": _summary_seed,
    "depth": _summary_depth, "host-bound": _summary_host_bound, "prediction": _summary_prediction,
    "3d": _summary_volumes, "correctness": _summary_correctness,
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
