"""``python -m effidense COMMAND ...``: see :mod:`effidense.cli`."""
import sys

try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C before the dispatcher, which answers it from then on, is loaded
    print("effidense: interrupted (Ctrl-C)", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
