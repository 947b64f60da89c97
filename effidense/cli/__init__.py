"""effidense's commands: ``effidense bench|convert|gradcheck|train|gpu-report|plan ...`` (also
``python -m effidense ...``).

Each command is a module here with ``main(argv) -> exit code``; ``tools/*.py`` are thin fronts over the same code.
The command imports nothing heavy before its own arguments parse (see ``effidense/__init__.py``), so ``--help`` and
usage errors answer at once; ``tests/test_cli.py`` counts the modules they import.
"""
from __future__ import annotations

import gc
import importlib
import os
import signal
import sys
from collections.abc import Sequence

COMMANDS = {
    "bench": "benchmark memory modes side by side with torchvision's and timm's DenseNets",
    "convert": ("convert DenseNet and FC-DenseNet weights between torchvision, timm, MONAI (2D and 3D) and effidense; "
                "inflate 2D to 3D"),
    "gradcheck": "check that every memory mode computes the plain model's outputs, gradients and BN statistics",
    "train": "train with the built-in timm-based trainer (timm's train.py flags)",
    "gpu-report": "the GPU evidence run: bench, max batch, the planner's prediction, 3D, gradcheck (--smoke: CPU)",
    "plan": "predict a training step's peak memory and the largest batch that fits a GPU, without the GPU",
    "timm": "run timm's own train.py/validate.py/benchmark.py/inference.py with the effi_* models registered",
    "models": "list the model names --model takes",
}


def _usage() -> str:
    lines = ["usage: effidense COMMAND [ARGS...]   (effidense COMMAND --help for each command's flags)", "",
             "commands:"]
    lines += [f"  {name:<10} {what}" for name, what in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``effidense COMMAND ...`` (``argv``: the arguments, default ``sys.argv[1:]``); returns the exit code.

    Ctrl-C anywhere in it, the seconds a command spends importing torch included, is one line on stderr and the
    shell's code for SIGINT (130), not a traceback."""
    # argv None: the process's own command (console script, python -m), not a call from Python code
    return _interruptible(sys.argv[1:] if argv is None else list(argv), entry=argv is None)


def run_front(command: str) -> int:
    """What a ``tools/COMMAND.py`` front runs: ``effidense COMMAND`` with this process's arguments. The front
    imports only this module, so that the command's own imports (torch) happen where Ctrl-C is answered."""
    return _interruptible([command, *sys.argv[1:]], entry=True)


def ignore_ctrl_c() -> None:
    """For a process whose command has ended, however it ended: the process only exits now, and a Ctrl-C while it
    does would print a traceback from torch's exit handlers, or, once the interpreter has reset its handlers, kill it
    with no line and a code that is not the command's."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def prepare_exit() -> None:
    """For a process about to exit once its command (or a spawned DDP rank's work) is done: collect its garbage now
    (0.2 s once torch and timm are loaded) and freeze the rest out of the collector. The interpreter's exit otherwise
    spends about a second in collections that walk every object those libraries made. What is alive is torn down as
    before; only objects in reference cycles are left unfinalized, which no exit promises to finalize."""
    gc.collect()
    gc.freeze()


class _CtrlC:
    """SIGINT's handler for the process's own command: Python's (KeyboardInterrupt), noting that it came. CPython can
    turn the interrupt into another exception where it lands inside an import (building an ImportError, it raises
    "TypeError: expected a message argument"), which is then the Ctrl-C's all the same."""

    came = False

    def __call__(self, signum: int, frame: object) -> None:
        self.came = True
        raise KeyboardInterrupt


def _interruptible(argv: list[str], entry: bool) -> int:
    ctrl_c = _CtrlC()
    try:
        try:
            if entry:
                # The CPU peak is read from torch.profiler, whose kineto otherwise logs each profile's start and stop
                # to stderr, and on a machine without a GPU an ERROR that it found none.
                os.environ.setdefault("KINETO_LOG_LEVEL", "6")
                if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where it is ignored
                    signal.signal(signal.SIGINT, ctrl_c)
            code = _run(argv)
        finally:
            if entry:
                ignore_ctrl_c()
    except Exception:
        if not ctrl_c.came:
            raise
        code = _interrupted()
    except KeyboardInterrupt:
        code = _interrupted()
    if entry:
        prepare_exit()
    return code


def _interrupted() -> int:
    print("effidense: interrupted (Ctrl-C)", file=sys.stderr)
    return 130


def _run(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from .. import __version__

        print(f"effidense {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        from ..configs import suggest

        hint = suggest(command, list(COMMANDS)) or f"choose one of: {', '.join(COMMANDS)}"
        print(f"error: unknown command {command!r}; {hint} (effidense --help)", file=sys.stderr)
        return 2
    return importlib.import_module(f"{__name__}.{command.replace('-', '_')}").main(rest)
