#!/usr/bin/env python3
"""Front for ``effidense gpu-report`` (logic: effidense/cli/gpu_report.py); ``--help`` explains."""
import sys

from effidense.cli.gpu_report import main

if __name__ == "__main__":
    sys.exit(main())
