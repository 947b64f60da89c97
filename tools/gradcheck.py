#!/usr/bin/env python3
"""Front for ``effidense gradcheck``, the installed command (logic: effidense/cli/gradcheck.py); ``--help`` explains."""
import sys

from effidense.cli.gradcheck import main

if __name__ == "__main__":
    sys.exit(main())
