"""The GPU evidence run: bench, the planner's prediction and gradcheck from one command, most important first, within
a time budget.

Writes DIR/report.json (every number, the environment and the plan) and DIR/summary.md, rewritten after each
section so that a run cut short keeps what it measured, plus each command's JSON and log; prints the summary last.
--smoke runs the same code on the CPU with a tiny model in about two minutes: run it before spending GPU time.
docs/gpu-run.md has the GPU recipe.
Examples:

  PYTHONPATH=. python tools/gpu_report.py --out /tmp/gpu
  PYTHONPATH=. python tools/gpu_report.py --out /tmp/smoke --smoke
  PYTHONPATH=. python tools/gpu_report.py --out /tmp/gpu --sections step-time,max-batch --time-budget 300
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from effidense.choices import REPORT_SECTIONS as SECTIONS
from effidense.cli.flags import OneLineParser

DEFAULT_BUDGET = {"gpu": 510.0, "smoke": 115.0}


def _sections(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown section(s) {', '.join(unknown) or repr(text)}; choose from "
                                         f"{', '.join(SECTIONS)}")
    return names


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < value < math.inf:  # an infinite budget never ends a section; NaN fails both comparisons
        raise argparse.ArgumentTypeError(f"must be positive and finite, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="effidense gpu-report", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="directory for report.json, summary.md and the logs (created if missing; its parent "
                             "must exist)")
    parser.add_argument("--smoke", action="store_true",
                        help="the same run on the CPU with a tiny model")
    parser.add_argument("--sections", type=_sections, action="append", nargs="+", metavar="NAME[,NAME]",
                        help=f"run only these sections (always in this order): {', '.join(SECTIONS)}")
    parser.add_argument("--time-budget", type=_seconds, metavar="S",
                        help=f"seconds for the whole run, shared out between the sections (default "
                             f"{DEFAULT_BUDGET['gpu']:g} on a GPU, {DEFAULT_BUDGET['smoke']:g} with --smoke)")
    parser.add_argument("--force", action="store_true", help="overwrite a report already in DIR")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    import torch  # the report's modules load torch: only once the arguments parse, so --help answers at once

    from effidense.fileio import check_writable
    from effidense.gpu_report import REPORT_JSON, SUMMARY_MD, format_summary, gpu_plan, run_report, smoke_plan

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        parser.error(f"--out: {out} is not a directory")
    if not out.parent.is_dir():
        parser.error(f"--out: parent directory {out.parent} does not exist")
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: this run measures a GPU; use --smoke for the CPU dry run of the same code")
    paths = [out / REPORT_JSON, out / SUMMARY_MD]
    if out.is_dir():
        problem = check_writable(paths, force=args.force)
        if problem:
            parser.error(f"--out: {problem}")
    else:
        try:
            os.mkdir(out)
        except OSError as error:
            parser.error(f"--out: cannot create {out}: {error.strerror}")
    budget = args.time_budget or DEFAULT_BUDGET["smoke" if args.smoke else "gpu"]
    plan = smoke_plan(budget) if args.smoke else gpu_plan(budget)

    def log(text: str) -> None:
        if not args.quiet:
            print(text, file=sys.stderr, flush=True)

    sections = [name for group in args.sections for names in group for name in names] if args.sections else None
    report = run_report(plan, out, sections, argv=argv, log=log)
    log(f"wrote {out / REPORT_JSON} and {out / SUMMARY_MD}")
    print(format_summary(report))  # last, so a terminal or log ends with it
    return 0 if all(s["status"] in ("ok", "skipped") for s in report["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
