#!/usr/bin/env python3
"""Front for ``effidense gpu-report`` (logic: effidense/cli/gpu_report.py); ``--help`` explains."""
import sys

EFFIDENSE_COMMAND = True  # effidense/__init__.py: torch and timm load once the arguments parse

from effidense.cli import run_front  # noqa: E402 (after the marker)

if __name__ == "__main__":
    sys.exit(run_front("gpu-report"))  # the command loads inside, where Ctrl-C is one line
