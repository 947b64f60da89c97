"""The one atomic writer and the one safe loader, shared by the converter, the trainer and the benchmark tools.

* :func:`atomic_write` writes through a temporary file in the target's directory, flushes it to disk and moves it
  into place with ``os.replace``: a reader, or a kill at any instant, sees the old file or the new one, never a part.
  Its two steps are public for writers that commit several files as one unit (the trainer's checkpoints):
  :func:`write_complete` (write and flush a temporary file) and :func:`publish` (move it into place), the one
  ``os.replace`` of the package. Ctrl-C during a write is held back until the write is finished or discarded
  (:func:`interrupts_deferred`), so an interrupted program leaves no temporary file behind.
* :func:`load_torch_file` loads with ``torch.load(weights_only=True)``, so a checkpoint can never run code, and tells
  an unsafe file (pickled objects) from a corrupt or truncated one. :func:`load_safetensors` reads safetensors.
  Both go by the content, never the name (:func:`content_format`): each reads its format whatever the file is
  called, and names the other format when handed it.
* :func:`save_torch_file` is ``torch.save`` whose failed write raises the system's error, and :func:`write_failure`
  finds the system's reason (``No space left on device``) in what any writer raised.
"""
from __future__ import annotations

import contextlib
import io
import os
import pickle
import pickletools
import re
import signal
import struct
import tempfile
import threading
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from .failures import short_error

__all__ = ["PLOT_FORMATS", "UnreadableFileError", "UnsafeFileError", "atomic_write", "atomic_write_bytes",
           "check_writable", "content_format", "outputs_problem",
           "file_mode", "interrupts_deferred", "load_safetensors", "load_torch_file", "publish", "save_torch_file",
           "short_error", "write_complete", "write_failure"]


class UnreadableFileError(ValueError):
    """A file that is missing, corrupt or truncated; the message names it."""


class UnsafeFileError(UnreadableFileError):
    """A torch file that holds pickled Python objects (code to run), refused by ``weights_only=True``."""


def file_mode() -> int:
    """The permissions a new file gets under the current umask (mkstemp and safetensors make owner-only files)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_complete(tmp: str | os.PathLike[str], write: Callable[[str], None]) -> None:
    """``write(tmp)``, then flush ``tmp`` to disk with the usual permissions, so a later ``os.replace`` publishes a
    complete file even across a power cut."""
    write(os.fspath(tmp))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.chmod(tmp, file_mode())


def publish(tmp: str | os.PathLike[str], path: str | os.PathLike[str]) -> Path:
    """Move the complete file ``tmp`` (see :func:`write_complete`) to ``path`` in one atomic step (``os.replace``):
    a reader sees the old file or the new one."""
    os.replace(tmp, path)
    return Path(path)


_deferring = False


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold back Ctrl-C (SIGINT) for the block: a write in progress is finished (or discarded, on an error), then the
    ``KeyboardInterrupt`` is raised. A no-op outside the main thread and inside another such block."""
    global _deferring
    if _deferring or threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    _deferring = True
    try:
        yield
    finally:
        _deferring = False
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], None]) -> Path:
    """Create ``path`` by ``write(tmp)`` on a temporary file beside it, moved into place only once complete.

    On any error, including in ``write``, no temporary file is left and an existing ``path`` is untouched; OSErrors
    propagate for the caller to name the file. Ctrl-C waits for the write to finish.
    """
    path = Path(path)
    tmp: str | None = None
    with interrupts_deferred():
        try:
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            os.close(fd)
            write_complete(tmp, write)
            publish(tmp, path)
            tmp = None
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.remove(tmp)
    return path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    return atomic_write(path, write)


def save_torch_file(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save(obj, path)`` through a Python file, whose failed write raises the system's OSError (a full disk:
    ``No space left on device``); torch's own writer reports only ``unexpected pos 704 vs 598``."""
    with open(path, "wb") as f:
        torch.save(obj, f)


def write_failure(error: BaseException) -> str:
    """The system's reason why a write failed (``No space left on device``), wherever the writer put it: an OSError,
    also one behind a library's own error, or the ``Os { code: 28, ... }`` that safetensors quotes; else the error's
    own line."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        code = re.search(r"\bOs \{ code: (\d+)", str(seen))
        if code:
            return os.strerror(int(code[1]))
        seen = seen.__cause__ or seen.__context__
    return short_error(error)


PLOT_FORMATS = (".png", ".pdf", ".svg")  # what the tools' --plot writes (matplotlib)


def outputs_problem(json_path: str | None, plot_path: str | None, force: bool) -> str | None:
    """Why a tool's ``--json``/``--plot`` outputs could not be written, checked before long work rather than after
    it: a plot format matplotlib is not asked for here, an unwritable or existing file, one file named twice, no
    matplotlib."""
    if plot_path is not None and Path(plot_path).suffix.lower() not in PLOT_FORMATS:
        return f"--plot: {plot_path} must end in {', '.join(PLOT_FORMATS)}"
    for flag, path in (("--json", json_path), ("--plot", plot_path)):
        problem = check_writable([path], force=force)
        if problem:
            return f"{flag}: {problem}"
    if json_path is not None and plot_path is not None and Path(json_path).resolve() == Path(plot_path).resolve():
        return "--json and --plot name the same file"
    if plot_path is not None:
        try:
            import matplotlib  # noqa: F401 - an optional dependency
        except ImportError:
            return "--plot needs matplotlib: pip install 'effidense[plot]' (or pip install matplotlib)"
    return None


def check_writable(paths: Iterable[str | os.PathLike[str] | None], force: bool = True) -> str | None:
    """Why one of ``paths`` could not be written (a missing or read-only directory, an existing file without
    ``force``), or None: for tools to check before long work rather than fail after it."""
    for path in paths:
        if path is None:
            continue
        path = Path(path)
        if path.is_dir():
            return f"{path} is a directory"
        if path.exists() and not force:
            return f"{path} exists (pass --force to overwrite)"
        directory = path.parent
        if not directory.is_dir():
            return f"cannot write {path}: directory {directory} does not exist"
        try:
            fd, probe = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".probe")
        except OSError as e:
            return f"cannot write {path}: {short_error(e)}"
        os.close(fd)
        os.remove(probe)
    return None


def _refusal_reason(error: BaseException) -> str:
    # e.g. "Unsupported global: GLOBAL pkg.Class was not an allowed global by default. Please use ..."
    m = re.search(r"(Unsupported global[^\n]*?)(?: was not an allowed|\. |\n|$)", str(error), re.IGNORECASE)
    return m[1].strip() if m else short_error(error)


_PICKLE_OPCODES = frozenset(ord(op.code) for op in pickletools.opcodes)
# the opcodes that import or build objects: the ones an unsafe file needs, and those of torch's own tensors
_OBJECT_OPCODES = frozenset(ord(op.code) for op in pickletools.opcodes if op.name in (
    "GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX", "BUILD", "EXT1", "EXT2", "EXT4"))
_PICKLE_READ_LIMIT = 64 << 20  # a torch file's pickles come before its tensor bytes and are far smaller


def _pickle_bytes(path: Path) -> bytes:
    """The bytes torch unpickles from ``path``: the zip format's ``data.pkl``, or the legacy format's leading pickles
    (empty when the zip cannot be read)."""
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                name = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                return archive.read(name)[:_PICKLE_READ_LIMIT] if name else b""
        except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, ValueError):
            return b""
    with open(path, "rb") as f:
        return f.read(_PICKLE_READ_LIMIT)


def _well_formed_opcodes(data: bytes) -> set[int]:
    """The opcodes of the complete, consistent pickles at the start of ``data`` (pickletools checks each one's
    opcodes, arguments, stack and memo), up to the first that is none: random bytes give next to nothing."""
    stream, seen = io.BytesIO(data), set()
    while stream.tell() < len(data):
        start = stream.tell()
        try:
            pickletools.dis(stream, out=io.StringIO())
        except Exception:  # pickletools raises ValueError, EOFError, KeyError...: these bytes are no pickle
            break
        seen.update(ord(op.code) for op, _, _ in pickletools.genops(data[start:stream.tell()]))
    return seen


def _is_unsafe(error: BaseException, path: Path) -> bool:
    """Whether torch's weights-only unpickler refused an object to build (code to run), rather than stumbled on bytes
    that are no pickle at all: every refusal starts "Weights only load failed", so its reason decides, and the file
    must hold a well-formed pickle that does what the reason says (random bytes can spell a pickle opcode, or the
    'PK' of a zip file that is none)."""
    text = str(error)
    operand = re.search(r"Unsupported operand (\d+)", text)
    if operand:  # an opcode it does not run (INST, OBJ, EXT*: objects) or a byte that is no opcode (random bytes)
        needed = {int(operand[1])} & _PICKLE_OPCODES
    elif re.search(r"global|reduce|can only build|unsupported (?:class|type)", text, re.IGNORECASE):
        needed = set(_OBJECT_OPCODES)
    else:
        return False
    return bool(needed & _well_formed_opcodes(_pickle_bytes(path)))


def _corrupt_reason(error: BaseException) -> str:
    # the unpickler's own words, without torch's advice on weights_only (which a corrupt file does not need)
    m = re.search(r"WeightsUnpickler error: (.*?)(?:\s+Check the documentation|$)", str(error), re.DOTALL)
    return short_error(m[1]) if m else short_error(error)


def _readable(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    if not path.is_file():
        raise UnreadableFileError(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    if path.stat().st_size == 0:
        raise UnreadableFileError(f"{path}: the file is empty")
    return path


def content_format(path: str | os.PathLike[str]) -> str | None:
    """What the first bytes of ``path`` say it is: ``"safetensors"``, ``"torch"`` (``torch.save``'s zip format, or
    its legacy one, a protocol 2+ pickle) or None, whatever the file's name (torch.load and timm go by the name)."""
    path = Path(path)
    with path.open("rb") as f:
        head = f.read(9)
    # safetensors: an 8-byte little-endian header length, then the JSON header
    looks_safetensors = len(head) == 9 and head[8:9] == b"{"
    if looks_safetensors and 0 < struct.unpack("<Q", head[:8])[0] <= path.stat().st_size - 8:
        return "safetensors"
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return "torch"
    return "safetensors" if looks_safetensors else None  # a header that the rest of the file does not hold


def _is_torchscript(path: Path) -> bool:
    # torch.jit.save's zip holds the model's code and constants beside the pickled data that torch.save writes
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/constants.pkl") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return False


def load_torch_file(path: str | os.PathLike[str], safe_globals: Iterable[Any] = ()) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; refuses pickled objects (other than ``safe_globals``) as
    unsafe and names the file in every error. The content decides: a safetensors file is named as one."""
    path = _readable(path)
    if content_format(path) == "safetensors":
        raise UnreadableFileError(f"{path} is not a PyTorch checkpoint (it is a safetensors file)")
    if _is_torchscript(path):  # torch.load would warn, then fail as if the file were corrupt
        raise UnreadableFileError(f"{path} is a TorchScript archive (a scripted or traced model), not a checkpoint of "
                                  "weights: load it with torch.jit.load and save its state_dict() with torch.save")
    try:
        # an open file, not the path: torch.load hands any path ending in .safetensors to safetensors
        with torch.serialization.safe_globals(list(safe_globals)), path.open("rb") as f:
            return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if _is_unsafe(e, path):  # an object to build, i.e. code to run
            raise UnsafeFileError(
                f"{path}: refused to load (unsafe): the file holds pickled Python objects, not only tensors "
                f"({_refusal_reason(e)}); torch.load(weights_only=True) protects you from code in checkpoints. "
                "If you trust the file, re-save its state_dict alone with torch.save") from None
        raise UnreadableFileError(f"{path}: corrupt or truncated checkpoint ({_corrupt_reason(e)})") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, struct.error, KeyError,
            AttributeError, TypeError, IndexError) as e:
        raise UnreadableFileError(f"{path}: corrupt or truncated checkpoint ({short_error(e)})") from None


def load_safetensors(path: str | os.PathLike[str],
                     tensors: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of a safetensors file (none with ``tensors=False``: its header alone), on the CPU, and its
    metadata; a malformed or truncated file names itself, and a file that is no safetensors file says what it is."""
    from safetensors import safe_open

    path = _readable(path)
    found = content_format(path)
    if found == "torch":
        raise UnreadableFileError(f"{path} is not a safetensors file (it looks like a PyTorch checkpoint)")
    if found is None:
        raise UnreadableFileError(f"{path} is not a safetensors file (nor a PyTorch checkpoint): corrupt, or of "
                                  "another format")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            read = {key: f.get_tensor(key) for key in f.keys()} if tensors else {}  # noqa: SIM118 (not a dict)
    except Exception as e:  # safetensors raises its own SafetensorError for every malformed file
        raise UnreadableFileError(f"{path}: corrupt or truncated safetensors file ({short_error(e)})") from None
    return read, metadata
