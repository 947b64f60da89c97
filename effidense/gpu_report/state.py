"""One run's state: the plan, the clock and each section's share of the budget, the report and where it is written."""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..fileio import atomic_write_bytes
from ..harness import environment
from .plan import REPORT_JSON, SCHEMA, SECTIONS, SUMMARY_MD, OutOfTime, Plan, plan_to_json
from .summary import format_summary


class Run:
    """State of one run: the plan, the clock, the report so far and where it is written."""

    def __init__(self, plan: Plan, out_dir: Path, sections: Sequence[str], argv: Sequence[str] | None,
                 log: Callable[[str], None]) -> None:
        self.plan, self.out_dir, self.sections, self.log = plan, out_dir, list(sections), log
        self.device = torch.device(plan.device)
        self.started = time.monotonic()
        self.end = self.started + plan.time_budget_s
        self.deadline = self.end
        self.report: dict[str, Any] = {
            "schema": SCHEMA, "complete": False, "smoke": plan.smoke,
            "environment": environment(plan.device, argv),
            "plan": plan_to_json(plan),
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
