"""Running the sections in order, each under its share of the time budget: the commands as subprocesses (a crash or
an exhausted GPU ends only its command); the report is written after each."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..failures import short_error
from ..fileio import atomic_write_bytes
from ..harness import environment, release, torch_threads
from .plan import REPORT_JSON, SCHEMA, SECTIONS, SUMMARY_MD, OutOfTime, Plan
from .summary import format_summary

ROOT = Path(__file__).resolve().parents[2]  # the checkout (or site-packages) that holds this package


class Run:
    """One run's state: the plan, the clock and each section's share of the budget, the report and where it goes."""

    def __init__(self, plan: Plan, out_dir: Path, sections: Sequence[str], argv: Sequence[str] | None,
                 log: Callable[[str], None]) -> None:
        self.plan, self.out_dir, self.sections, self.log = plan, out_dir, list(sections), log
        self.device = torch.device(plan.device)
        self.started = time.monotonic()
        self.end = self.deadline = self.started + plan.time_budget_s
        self.report: dict[str, Any] = {
            "schema": SCHEMA, "complete": False, "smoke": plan.smoke, "environment": environment(plan.device, argv),
            "plan": {**plan.__dict__, "spec": plan.spec.describe()},
            "sections": {name: {"title": SECTIONS[name][0], "status": "pending"} for name in self.sections},
        }

    def start_section(self, name: str) -> dict[str, Any]:
        now = time.monotonic()
        later = self.sections[self.sections.index(name):]
        share = SECTIONS[name][1] / sum(SECTIONS[s][1] for s in later)
        self.deadline = now + max(self.end - now, 0.0) * share
        section = self.report["sections"][name]
        section.update(status="running", budget_s=round(self.deadline - now, 1), data={})
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


def _argv(run: Run, section: str, label: str, command: Sequence[str]) -> tuple[list[str], Path | None]:
    """The full command line of one of ``section``'s commands, and the JSON file it writes (None for pytest)."""
    if command[0] == "pytest":
        return [sys.executable, "-m", "pytest", *command[1:], "-q", "-p", "no:cacheprovider", str(ROOT / "tests")], None
    plan, path = run.plan, run.out_dir / f"{section}-{label.replace(' ', '-').replace('--', '')}.json"
    argv = [sys.executable, "-m", "effidense", *command, "--device", plan.device, "--json", str(path), "--force"]
    if command[0] in ("bench", "plan"):
        argv[4:4] = plan.model_flags(section)
    if plan.threads:
        argv += ["--threads", str(plan.threads)]
    return argv, path


def _run_commands(run: Run, section: dict[str, Any]) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    name = next(n for n, s in run.report["sections"].items() if s is section)
    commands = section["data"].setdefault("commands", [])
    if not run.plan.commands.get(name):
        section["data"]["skipped"] = "needs a CUDA GPU" if run.plan.device != "cuda" else "nothing to run"
    for label, command in run.plan.commands.get(name, ()):
        run.check_time()
        argv, json_path = _argv(run, name, label, command)
        entry: dict[str, Any] = {"check": label, "command": " ".join(argv)}
        commands.append(entry)
        if command[0] == "pytest" and not (ROOT / "tests").is_dir():
            entry.update(status="skipped", passed=None, last_line="no tests/ directory beside the package")
            continue
        run.log(f"[{name}] {label}")
        start = time.monotonic()
        try:
            done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True,
                                  timeout=max(run.remaining(), 1e-3))
            stdout, output = done.stdout, done.stdout + done.stderr
            entry.update(status="ran", rc=done.returncode, passed=done.returncode == 0)
        except subprocess.TimeoutExpired as error:
            stdout = _text(error.stdout)
            output = stdout + _text(error.stderr)
            entry.update(status="out of time", rc=None, passed=None)
        entry["seconds"] = round(time.monotonic() - start, 1)
        # the command's verdict: its last line on stdout other than where it wrote its JSON, else its last line
        lines = [line for line in stdout.splitlines() if line.strip() and not line.startswith("wrote ")] or \
            [line for line in output.splitlines() if line.strip()]
        entry.update(last_line=lines[-1].strip() if lines else "", stdout=stdout,
                     log=f"{name}-{label.replace(' ', '_').replace('-', '')}.log")
        atomic_write_bytes(run.out_dir / entry["log"], output.encode())
        if json_path is not None and json_path.is_file() and entry["status"] == "ran":
            entry["json"] = json_path.name
            entry["result"] = json.loads(json_path.read_text())
        run.save()
        if entry["status"] == "out of time":
            raise OutOfTime(f"{label} did not finish in the time left")
        if not entry["passed"]:
            raise RuntimeError(f"{label} exited with status {entry['rc']}: {entry['last_line']}")


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


SECTION_RUNNERS: dict[str, Callable[[Run, dict[str, Any]], None]] = {
    "step-time": _run_commands, "max-batch": _run_commands, "prediction": _run_commands, "3d": _run_commands,
    "correctness": _run_commands,
}


def run_report(plan: Plan, out_dir: str | os.PathLike[str], sections: Sequence[str] | None = None,
               argv: Sequence[str] | None = None, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run ``sections`` (default: all, always in importance order) and return the report; ``out_dir`` must exist.

    The report and summary are rewritten after every section and command, so an interrupted run leaves what it
    measured. A section that raises is recorded as failed and the run goes on."""
    chosen = [s for s in SECTIONS if sections is None or s in sections]
    run = Run(plan, Path(out_dir), chosen, argv, log or (lambda text: None))
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
            section["status"] = "skipped" if section["data"].get("skipped") else "ok"
        except OutOfTime as error:
            section["status"], section["error"] = "out of time", str(error)
        except Exception as error:  # recorded; the next section still runs
            section["status"], section["error"] = "failed", short_error(error, kind=True)
        finally:
            section["seconds"] = round(time.monotonic() - start, 1)
            release(run.device)
        run.log(f"[{name}] {section['status']} in {section['seconds']:.1f} s"
                + (f": {section['error']}" if section.get("error") else ""))
        run.save()
    run.report["complete"] = True
    run.save()
