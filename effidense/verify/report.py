"""The readable report (a table of the mode comparisons, one line per other check) and the JSON document."""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from typing import Any

from .core import MODE_CHECK_DESCRIPTIONS, RAN, Check

__all__ = ["format_report", "checks_to_json"]


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    if value == 0:
        return "0"
    if math.isinf(value):
        return "inf"
    return f"{value:.2e}"


def _cell(check: Check | None) -> str:
    if check is None:
        return ""
    if check.max_rel is None:
        return "ok" if check.passed else "FAIL"
    if check.passed and check.max_abs == 0:
        return "="
    text = "DIFF" if math.isinf(check.max_rel) else f"{check.max_rel:.1e}"
    return text if check.passed else text + "!"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*header).rstrip(), fmt.format(*("-" * w for w in widths))] + \
        [fmt.format(*r).rstrip() for r in rows]


def format_report(checks: Iterable[Check], header: Sequence[str] = (), verbose: bool = False) -> str:
    """Readable report: the mode comparisons as a table (one row per case and variant, one column per check),
    the gradcheck and DDP checks one line each, every failure spelled out, then the verdict."""
    checks = list(checks)
    lines = list(header) + ([""] if header else [])
    in_table = [c.group == "modes" and c.what != RAN for c in checks]
    modes = [c for c, t in zip(checks, in_table, strict=True) if t]
    others = [c for c, t in zip(checks, in_table, strict=True) if not t or verbose]
    if modes:
        columns = list(dict.fromkeys(c.what for c in modes))
        rows: dict[tuple[str, str], dict[str, Check]] = {}
        for c in modes:
            rows.setdefault((c.case, c.subject), {})[c.what] = c
        table = []
        for (case, subject), found in rows.items():
            tols = sorted({c.tol for c in found.values() if c.tol})
            verdict = "PASS" if all(c.passed for c in found.values()) else "FAIL"
            table.append([case, subject, "/".join(f"{t:.0e}" for t in tols) or "-",
                          *(_cell(found.get(col)) for col in columns), verdict])
        lines += ["Memory modes against plain, trained side by side from the same weights and non-default BN "
                  "running stats:"]
        lines += _table(["case", "variant", "tol", *columns, "result"], table)
        lines += ["  = bitwise identical; a number is the relative difference: max|variant - plain| over the check's",
                  "  tensors / max|plain| over them, worst step; ! marks a failure; tol applies to all but BN count,",
                  "  which must be identical. Columns:"]
        lines += [f"    {k:<12} {v}" for k, v in MODE_CHECK_DESCRIPTIONS.items() if k in columns]
        lines.append("")
    if others:
        lines.append("abs: largest absolute difference; rel: that over the largest reference magnitude; tol: the "
                     "largest rel allowed (0: identical).")
        width = max(len(c.what) for c in others)
        section = None
        for c in others:
            if (c.group, c.case, c.subject) != section:
                section = (c.group, c.case, c.subject)
                lines.append(f"[{c.group}] {c.case}: {c.subject}")
            lines.append(f"  {'PASS' if c.passed else 'FAIL'}  {c.what.ljust(width)}  abs {_num(c.max_abs):>8}  "
                         f"rel {_num(c.max_rel):>8}  tol {_num(c.tol):>8}  {c.detail}")
        lines.append("")
    failed = [c for c in checks if not c.passed]
    if not checks:
        lines.append("FAIL: nothing was checked")
    elif failed:
        lines.append(f"FAIL: {len(failed)} of {len(checks)} checks failed:")
        lines += [f"  {c.case}: {c.subject}: {c.what}: rel {_num(c.max_rel)} > tol {_num(c.tol)} ({c.detail})"
                  if c.max_rel is not None else f"  {c.case}: {c.subject}: {c.what}: {c.detail}" for c in failed]
    else:
        lines.append(f"PASS: all {len(checks)} checks passed")
    return "\n".join(lines)


def checks_to_json(checks: Iterable[Check], environment: dict[str, Any]) -> dict[str, Any]:
    """Every check plus the environment, JSON-serialisable (infinities as strings)."""
    def clean(value: Any) -> Any:
        return str(value) if isinstance(value, float) and not math.isfinite(value) else value

    items = [{k: clean(v) for k, v in asdict(c).items()} for c in checks]
    return {"schema": "effidense.gradcheck/1", "environment": environment, "passed": all(c["passed"] for c in items)
            and bool(items), "checks": items}
