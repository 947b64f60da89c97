#!/usr/bin/env python3
"""Front for ``effidense train``, the installed command (logic: effidense/cli/train.py); ``--help`` explains."""
import sys

from effidense.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
