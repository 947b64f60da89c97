"""Calls run side by side, each in a spawned process of its own: a step on fake tensors is host-bound Python, so each
variant the planner plans takes one core.

Processes are spawned, not forked (autograd's worker threads do not survive a fork), so a call's function and
arguments must pickle, and a spawned process imports the calling script again: a script guards its top level
(``if __name__ == "__main__":``), as :mod:`multiprocessing` asks. A process that dies (out of memory, a signal) fails
its call alone; an interrupt, or any error in the caller, terminates every process still running.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

__all__ = ["cores", "in_processes", "pickles"]


def cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def pickles(value: Any) -> bool:
    """Whether ``value`` can be handed to a spawned process (a function defined inside another cannot)."""
    try:
        pickle.dumps(value)
    except (pickle.PicklingError, AttributeError, TypeError):
        return False
    return True


def _answer(sender: Connection, function: Callable[..., Any], args: tuple) -> None:
    try:
        answer = (True, function(*args))
    except BaseException as error:  # handed back whole, so the caller raises what the call raised
        answer = (False, error if pickles(error) else RuntimeError(f"{type(error).__name__}: {error}"))
    sender.send(answer)


@contextlib.contextmanager
def _interrupts_ignored() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():  # only the main thread sets handlers
        yield
        return
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def in_processes(function: Callable[..., Any], calls: Sequence[tuple[str, tuple]], workers: int,
                 done: Callable[[str, int], None] | None = None) -> dict[str, Any]:
    """``function(*args)`` for each ``(name, args)`` of ``calls``, at most ``workers`` at a time, each in a process of
    its own; the results by name. A call that raised raises here; a process that died without answering gives a
    :class:`ChildProcessError` as its result. ``done(name, count)`` is told of each call as it ends."""
    context = multiprocessing.get_context("spawn")
    waiting, running, results = list(calls), {}, {}
    try:
        while waiting or running:
            while waiting and len(running) < workers:
                name, args = waiting.pop(0)
                receiver, sender = context.Pipe(duplex=False)
                process = context.Process(target=_answer, args=(sender, function, args), daemon=True)
                with _interrupts_ignored():  # inherited: Ctrl-C is the caller's to answer, by terminating them
                    process.start()
                sender.close()  # the child's end: the parent's receiver then sees the end if the child dies
                running[receiver] = name, process
            for receiver in wait(list(running)):
                name, process = running.pop(receiver)
                try:
                    answered, value = receiver.recv()
                except EOFError:
                    process.join()
                    answered, value = True, ChildProcessError(
                        f"its worker process died without an answer (exit code {process.exitcode})")
                process.join()
                if not answered:
                    raise value
                results[name] = value
                if done is not None:
                    done(name, len(results))
    finally:
        for _, process in running.values():
            process.terminate()
    return results
