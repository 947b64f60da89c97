"""Running the sections in order, each under its share of the time budget."""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..failures import short_error
from ..harness import release, torch_threads
from .plan import SECTIONS, OutOfTime, Plan
from .sections import GOALS, SECTION_RUNNERS, goal
from .state import Run


def run_report(plan: Plan, out_dir: str | os.PathLike[str], sections: Sequence[str] | None = None,
               argv: Sequence[str] | None = None, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run ``sections`` (default: all, always in importance order) and return the report; ``out_dir`` must exist.

    The report and summary are rewritten after every section (and every step-time cell), so an interrupted run
    leaves what it measured. A section that raises is recorded as failed and the run goes on.
    """
    chosen = [s for s in SECTIONS if sections is None or s in sections]
    run = Run(plan, Path(out_dir), chosen, argv, log or (lambda text: None))
    if run.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    with torch_threads(plan.threads):
        _run_sections(run)
    return run.report


def _run_sections(run: Run) -> None:
    for name in run.sections:
        section = run.start_section(name)
        run.log(f"[{name}] {section['title']} (budget {section['budget_s']:.0f} s)")
        start = time.monotonic()
        try:
            SECTION_RUNNERS[name](run, section)
            section["status"] = "ok"
        except OutOfTime as error:
            section["status"], section["error"] = "out of time", str(error)
        except Exception as error:  # recorded; the next section still runs
            section["status"], section["error"] = "failed", short_error(error, kind=True)
        finally:
            section["seconds"] = round(time.monotonic() - start, 1)
            release(run.device)
            if run.device.type == "cuda":
                torch.cuda.set_per_process_memory_fraction(1.0, run.device)
        try:
            GOALS.get(name, lambda r, s: None)(run, section)
        except Exception as error:  # a bug in judging goals must not cost the measurements
            section["goals"].append(goal("judging the goals", None, short_error(error, kind=True)))
        run.log(f"[{name}] {section['status']} in {section['seconds']:.1f} s"
                + (f": {section['error']}" if section.get("error") else ""))
        run.save()
    run.report["complete"] = True
    run.save()
