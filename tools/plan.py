#!/usr/bin/env python3
"""Front for ``effidense plan``, the installed command (logic: effidense/cli/plan.py); ``--help`` explains."""
import sys

from effidense.cli.plan import main

if __name__ == "__main__":
    sys.exit(main())
