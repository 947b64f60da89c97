"""The largest value that fits: a batch in GPU memory, a depth under a budget (``fits`` decides, monotone)."""
from __future__ import annotations

from collections.abc import Callable

__all__ = ["bisect_fits", "largest_batch"]


def bisect_fits(fits: Callable[[int], bool], good: int, bad: int) -> int:
    """The largest ``n`` in ``[good, bad)`` for which ``fits`` is true, given that ``good`` fits (or is a floor that
    needs no probe) and ``bad`` does not, ``fits`` being monotone."""
    while bad - good > 1:
        probe = (good + bad) // 2
        if fits(probe):
            good = probe
        else:
            bad = probe
    return good


def largest_batch(fits: Callable[[int], bool], start: int, limit: int) -> int:
    """Largest batch in [1, limit] for which ``fits`` is true, assuming it is monotone; 0 if none fits.

    Doubles from ``start`` until a batch fails (or ``limit``), then bisects between the last success and the first
    failure: about 2 * log2(answer / start) probes.
    """
    if start < 1 or limit < start:
        raise ValueError(f"need 1 <= start <= limit, got start={start}, limit={limit}")
    if fits(start):
        good, bad = start, None
        while bad is None:
            if good == limit:
                return good
            probe = min(good * 2, limit)
            if fits(probe):
                good = probe
            else:
                bad = probe
    else:
        good, bad = 0, start
    return bisect_fits(fits, good, bad)
