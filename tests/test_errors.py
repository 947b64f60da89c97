"""The one error formatter: every tool turns an exception into one line the same way."""
import torch

from effidense.failures import is_oom, short_error
from effidense.fileio import short_error as fileio_short_error


def test_short_error_is_one_line_cut_to_the_limit():
    error = ValueError("first line\n  second   line\n")
    assert short_error(error) == "first line second line"
    assert short_error(error, kind=True) == "ValueError: first line second line"
    assert short_error(ValueError("x" * 50), limit=10) == "x" * 10 + "..."
    assert short_error(KeyError()) == "KeyError" and short_error(KeyError(), kind=True) == "KeyError"


def test_out_of_memory_is_named_so():
    oom = RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported")
    assert is_oom(oom) and is_oom(torch.cuda.OutOfMemoryError("Tried to allocate 2 GiB"))
    assert short_error(oom, kind=True).startswith("out of memory: CUDA error: out of memory CUDA kernel")
    assert not is_oom(ValueError("out of memory"))
    # The host's allocator runs out too (a batch too large for the CPU), and Python's MemoryError.
    cpu = RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                       "tried to allocate 240000000000000000 bytes. Error code 12 (Cannot allocate memory)")
    assert is_oom(cpu) and is_oom(MemoryError()) and short_error(cpu, kind=True).startswith("out of memory: [enforce")
    assert not is_oom(RuntimeError("Storage size calculation overflowed"))


def test_one_formatter_everywhere():
    import effidense.benchmark as benchmark
    from effidense.benchmark import cuda

    assert fileio_short_error is short_error and cuda.is_oom is is_oom
    assert not hasattr(benchmark, "one_line")


def test_a_failed_write_reports_the_systems_reason():
    import errno
    import os

    from effidense.fileio import write_failure

    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/tmp/.out.pth.x.tmp")
    assert write_failure(full) == "No space left on device"  # the reason, not the temporary file's name
    try:
        try:
            raise full
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None
    except RuntimeError as wrapped:  # torch's writer, failing after the system's error
        assert write_failure(wrapped) == "No space left on device"
    quoted = RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
                          'left on device" })')
    assert write_failure(quoted) == "No space left on device"
    assert write_failure(RuntimeError("file write failed\n")) == "file write failed"
