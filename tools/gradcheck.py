#!/usr/bin/env python3
"""Front for ``effidense gradcheck``, the installed command (logic: effidense/cli/gradcheck.py); ``--help`` explains."""
import sys

EFFIDENSE_COMMAND = True  # effidense/__init__.py: torch and timm load once the arguments parse

from effidense.cli import run_front  # noqa: E402 (after the marker)

if __name__ == "__main__":
    sys.exit(run_front("gradcheck"))  # the command loads inside, where Ctrl-C is one line
