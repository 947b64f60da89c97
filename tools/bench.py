#!/usr/bin/env python3
"""Front for ``effidense bench``, the installed command (logic: effidense/cli/bench.py); ``--help`` explains."""
import sys

from effidense.cli.bench import main

if __name__ == "__main__":
    sys.exit(main())
