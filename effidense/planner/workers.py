"""Calls run side by side in spawned worker processes: a step on fake tensors is host-bound Python, so each variant
the planner plans takes one core.

Processes are spawned, not forked (autograd's worker threads do not survive a fork), so a call's function and
arguments must pickle, and a spawned process imports the calling script again: a script guards its top level
(``if __name__ == "__main__":``), as :mod:`multiprocessing` asks. A process that dies (out of memory, a signal) fails
its call alone; an interrupt, or any error in the caller, terminates every worker.
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


def _serve(channel: Connection, function: Callable[..., Any]) -> None:
    """A worker: ``function(*args)`` for each ``args`` the caller sends, until it sends None."""
    while (args := channel.recv()) is not None:
        try:
            answer = (True, function(*args))
        except BaseException as error:  # handed back whole, so the caller raises what the call raised
            answer = (False, error if pickles(error) else RuntimeError(f"{type(error).__name__}: {error}"))
        channel.send(answer)


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
    """``function(*args)`` for each ``(name, args)`` of ``calls``, in at most ``workers`` processes, each taking the
    next call as it finishes one (so what it imported and cached serves the next); the results by name. A call that
    raised raises here; a process that died without answering gives a :class:`ChildProcessError` as its call's
    result, and a fresh process takes the calls left. ``done(name, count)`` is told of each call as it ends."""
    context = multiprocessing.get_context("spawn")

    def start() -> tuple[Connection, Any]:
        channel, theirs = context.Pipe()
        process = context.Process(target=_serve, args=(theirs, function), daemon=True)
        with _interrupts_ignored():  # inherited: Ctrl-C is the caller's to answer, by terminating them
            process.start()
        theirs.close()  # the worker's end: the caller's then reads the end of the pipe if the worker dies
        return channel, process

    waiting, results = list(calls), {}
    idle = [start() for _ in range(min(workers, len(waiting)))]
    busy: dict[Connection, tuple[str, Any]] = {}
    try:
        while waiting or busy:
            while waiting and idle:
                channel, process = idle.pop()
                name, args = waiting.pop(0)
                channel.send(args)
                busy[channel] = name, process
            for channel in wait(list(busy)):
                name, process = busy.pop(channel)
                try:
                    answered, value = channel.recv()
                    idle.append((channel, process))
                except EOFError:
                    process.join()
                    answered, value = True, ChildProcessError(
                        f"its worker process died without an answer (exit code {process.exitcode})")
                    if waiting:
                        idle.append(start())
                if not answered:
                    raise value
                results[name] = value
                if done is not None:
                    done(name, len(results))
    finally:
        for _, process in [*idle, *busy.values()]:
            process.terminate()
    return results
