"""The one progress display of the tools: a tqdm bar on a terminal, plain lines in a log file or pipe.

A redirected stderr gets no ``\\r`` frames: off a terminal :class:`Progress` writes one line per ``interval_s``
seconds (and a last line when it closes), or, with ``interval_s=None``, the caller's own lines at the caller's own
cadence (:meth:`Progress.log`): the trainer's one line per ``--log-interval`` steps. ``effidense bench`` counts steps
with it, ``effidense gradcheck`` checks, ``effidense train`` an epoch's batches.
"""
from __future__ import annotations

import sys
import time
from typing import Any, TextIO

__all__ = ["Progress", "is_terminal"]


def is_terminal(stream: Any = None) -> bool:
    """Whether ``stream`` (default stderr) is an interactive terminal, where a redrawn bar belongs."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class Progress:
    """Counts ``total`` units of work under a description; silent when not ``enabled`` (e.g. on ranks other than 0).

    On a terminal a tqdm bar; elsewhere ``desc: n/total unit (p%) note`` lines, one per ``interval_s`` seconds
    (none with ``interval_s=None``: the caller writes its own with :meth:`log`). ``initial`` units are done already
    (a resumed epoch).
    """

    def __init__(self, total: int, desc: str, unit: str, enabled: bool = True, stream: TextIO | None = None,
                 interval_s: float | None = 10.0, initial: int = 0) -> None:
        self.total, self.desc, self.unit, self.enabled = total, desc, unit, enabled
        self.stream = sys.stderr if stream is None else stream
        self.interval_s = interval_s
        self.n, self.postfix, self.shown = initial, "", initial
        self.bar = None
        self.last_line = time.monotonic()
        if enabled and is_terminal(self.stream):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.stream, dynamic_ncols=True)

    def describe(self, desc: str) -> None:
        """What the work is now (e.g. the variant that runs)."""
        self.desc = desc
        if self.bar is not None:
            self.bar.set_description(desc)

    def note(self, text: str) -> None:
        """A detail of the current work that is not counted (compiling, a max-batch search)."""
        self.postfix = text
        if self.bar is not None:
            self.bar.set_postfix_str(text)

    def advance(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and self.interval_s is not None and time.monotonic() - self.last_line >= self.interval_s:
            self._line()

    def log(self, line: str, note: str = "", file: TextIO | None = None) -> None:
        """A report at the caller's cadence: on a terminal ``note`` goes next to the bar, elsewhere ``line`` is
        printed as it is (to ``file``, default the progress stream); nothing when not ``enabled``."""
        if self.bar is not None:
            self.note(note)
        elif self.enabled:
            print(line, file=self.stream if file is None else file, flush=True)
            self.last_line, self.shown = time.monotonic(), self.n

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.enabled and self.interval_s is not None and self.n != self.shown:
            self._line()
        self.enabled = False  # closing twice writes one last line

    def _line(self) -> None:
        percent = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        note = f" {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {self.n}/{self.total} {self.unit}{percent}{note}", file=self.stream, flush=True)
        self.last_line, self.shown = time.monotonic(), self.n
