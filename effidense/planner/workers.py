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
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
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
    """A worker: ready once ``function``'s module is imported (it says so), then ``function(*args)`` for each
    ``args`` the caller sends, until it sends None or goes."""
    channel.send(True)
    while (args := _received(channel)) is not None:
        try:
            answer = (True, function(*args))
        except BaseException as error:  # handed back whole, so the caller raises what the call raised
            answer = (False, error if pickles(error) else RuntimeError(f"{type(error).__name__}: {error}"))
        channel.send(answer)


def _received(channel: Connection) -> Any:
    try:
        return channel.recv()
    except EOFError:  # the caller ended
        return None


def _blocked_interrupts() -> None:
    """Block Ctrl-C in this thread: processes it spawns inherit the mask, so an interrupt is the caller's alone to
    answer (it terminates them)."""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})


def in_processes(function: Callable[..., Any], calls: Sequence[tuple[str, tuple]], workers: int,
                 done: Callable[[str, int], None] | None = None, here: Callable[[str], Any] | None = None,
                 wait: float = 0.0, taken: Callable[[str], None] | None = None) -> dict[str, Any]:
    """``function(*args)`` for each ``(name, args)`` of ``calls``, in at most ``workers`` spawned processes, each
    taking the next call as it finishes one (so what it imported and cached serves the next); the results by name.

    With ``here``, this process takes calls too, by ``here(name)``, from the same queue, and the processes start
    only once ``wait`` seconds have passed with calls still waiting: a job done sooner than a process takes to start
    never starts one, and a process takes calls only once it is ready, so one still starting holds none up. A call
    that raised raises here (no further call is taken); a process that died without answering gives a
    :class:`ChildProcessError` as its call's result, and a fresh process takes the calls left.
    ``taken(name)`` is told of each call a process takes, ``done(name, count)`` of each call as it ends."""
    context = multiprocessing.get_context("spawn")
    waiting, results, raised = list(calls), {}, []
    lock, finished, settled = threading.Lock(), threading.Event(), threading.Event()
    processes: list[Any] = []

    def take() -> tuple[str, tuple] | None:
        with lock:
            return waiting.pop(0) if waiting and not raised else None

    def record(name: str, answered: bool, value: Any) -> None:
        with lock:
            if not answered:
                raised.append(value)
                settled.set()
                return
            results[name] = value
            count = len(results)
            if count == len(calls):
                settled.set()
        if done is not None:
            done(name, count)

    def start() -> tuple[Connection, Any]:
        channel, theirs = context.Pipe()
        process = context.Process(target=_serve, args=(theirs, function), daemon=True)
        process.start()
        processes.append(process)
        theirs.close()  # the worker's end: the caller's then reads the end of the pipe if the worker dies
        return channel, process

    def died(process: Any) -> ChildProcessError:
        process.join()
        return ChildProcessError(f"its worker process died without an answer (exit code {process.exitcode})")

    def serve() -> None:  # one process's calls, from a thread of this process
        _blocked_interrupts()
        if here is not None and finished.wait(wait):
            return
        worker = None
        while True:
            if worker is None:  # calls are taken once it is ready, so a process still starting holds none up
                if not waiting or raised:  # only ever shrinks: nothing left for a fresh process
                    return
                worker = start()
                if _received(worker[0]) is None:  # it died starting
                    failure, worker = died(worker[1]), None
                    if here is not None or (call := take()) is None:
                        return  # this process plans what is left
                    record(call[0], True, failure)  # fails a call, so that a job planned in workers alone ends
                    continue
            if (call := take()) is None:
                break
            name, args = call
            if taken is not None:
                taken(name)
            channel, process = worker
            try:
                channel.send(args)
                answered, value = channel.recv()
            except (EOFError, OSError):
                answered, value, worker = True, died(process), None
            record(name, answered, value)
        with contextlib.suppress(OSError):  # a process that has gone needs no word
            worker[0].send(None)

    threads = [threading.Thread(target=serve, daemon=True) for _ in range(min(workers, len(waiting)))]
    for thread in threads:
        thread.start()
    try:
        while here is not None and (call := take()) is not None:
            try:
                answer = (True, here(call[0]))
            except Exception as error:
                answer = (False, error)
            record(call[0], *answer)
        finished.set()
        # every call answered, or one raised (which ends the job at once); not a process still starting, idle
        while len(results) < len(calls) and not raised and any(thread.is_alive() for thread in threads):
            settled.wait(0.1)
        if raised:
            raise raised[0]
    finally:
        finished.set()
        for process in processes:
            process.terminate()
        for process in processes:
            process.join(1.0)
    return results
