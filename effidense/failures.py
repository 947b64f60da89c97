"""How a failure is told: any exception as one line of text (every tool's error message and report entry), and
whether it is running out of memory."""
from __future__ import annotations

import torch

__all__ = ["is_oom", "short_error"]


def is_oom(error: BaseException) -> bool:
    """Whether ``error`` is running out of memory: the GPU's (including cuDNN/cuBLAS allocation failures) or the
    host's (torch's CPU allocator, Python's MemoryError)."""
    if isinstance(error, torch.cuda.OutOfMemoryError | MemoryError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def short_error(error: BaseException, limit: int = 200, kind: bool = False) -> str:
    """An exception's message on one line (its lines joined), cut to ``limit`` characters.

    With ``kind`` the message is preceded by what went wrong: ``out of memory`` for an OOM (:func:`is_oom`), else
    the exception's class name (``ValueError: ...``), as report entries show a failure."""
    text = " ".join(str(error).split())
    text = (text[:limit] + "...") if len(text) > limit else text
    if not kind:
        return text or type(error).__name__
    return f"{'out of memory' if is_oom(error) else type(error).__name__}: {text}".rstrip(": ")
