"""``python -m effidense COMMAND ...``: see :mod:`effidense.cli`."""
import sys

from .cli import main

sys.exit(main())
