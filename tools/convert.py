#!/usr/bin/env python3
"""Front for ``effidense convert``, the installed command (logic: effidense/cli/convert.py); ``--help`` explains."""
import sys

EFFIDENSE_COMMAND = True  # effidense/__init__.py: torch and timm load once the arguments parse

from effidense.cli import prepare_exit  # noqa: E402
from effidense.cli.convert import main  # noqa: E402 (after the marker)

if __name__ == "__main__":
    code = main()
    prepare_exit()
    sys.exit(code)
