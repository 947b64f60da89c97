"""``python -m effidense COMMAND ...``: see :mod:`effidense.cli`."""
import sys

try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C before the dispatcher, which answers it from then on, is loaded
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the process only exits now (effidense.cli.ignore_ctrl_c)
    print("effidense: interrupted (Ctrl-C)", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
