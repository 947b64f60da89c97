#!/usr/bin/env python3
"""Front for ``effidense convert``, the installed command (logic: effidense/cli/convert.py); ``--help`` explains."""
import sys

from effidense.cli.convert import main

if __name__ == "__main__":
    sys.exit(main())
