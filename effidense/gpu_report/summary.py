"""The markdown summary of a report: each section's status, the commands' own tables and last lines."""
from __future__ import annotations

from typing import Any

__all__ = ["format_summary"]


def _commands(data: dict[str, Any]) -> list[str]:
    lines = []
    for e in data.get("commands", []):
        verdict = {True: "PASS", False: "FAIL", None: e.get("status", "-").upper()}[e.get("passed")]
        lines += ["", f"`{e['check']}`: {verdict}" + (f" in {e['seconds']:.1f} s" if "seconds" in e else "")
                  + (f", log {e['log']}" if e.get("log") else "")]
        table = [line for line in e.get("stdout", "").splitlines() if line.startswith("|")]
        lines += ["", *table] if table else ["", f"    {e.get('last_line', '')}"]
    if data.get("skipped"):
        lines += ["", f"skipped: {data['skipped']}"]
    return lines


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
    for i, (name, section) in enumerate(report["sections"].items(), 1):
        timing = f", {section['seconds']:.0f} s of {section['budget_s']:.0f} s" if "seconds" in section else ""
        lines += ["", f"## {i}. {section['title']} [{name}]", "",
                  f"status: {section['status']}{timing}" + (f" ({section['error']})" if section.get("error") else "")]
        data = section.get("data", {})
        lines += _commands(data)
    return "\n".join(lines)
