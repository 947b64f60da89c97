"""The memory mode, and the slices a rerun's backward goes through: what every layer of effidense's DenseNets has,
set on a model or block and so on every layer below it."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..arguments import check_slices, resolve_memory
from .light import slice_count

__all__ = ["MemoryMode", "SCRIPTING_UNSUPPORTED"]

SCRIPTING_UNSUPPORTED = (
    "effidense's models do not support TorchScript (torch.jit.script), which PyTorch deprecates: use "
    "torch.export.export, torch.onnx.export or torch.compile, or torch.jit.trace for a TorchScript module (MONAI's "
    "convert_to_torchscript: use_trace=True)")


class MemoryMode(nn.Module):
    """What has a memory mode (``memory``) and a backward that may go through the batch in slices
    (``backward_slices``): setting either on a module sets it on every layer below."""

    _memory, _slices = "efficient", "auto"
    rerun_state = ("_memory",)  # what a segment's rerun runs with as its first run found it (:mod:`.recompute`)

    @property
    def memory(self) -> str:
        """'plain', 'efficient' or 'frugal' (see the module docstring)."""
        return self._memory

    @memory.setter
    def memory(self, memory: str) -> None:
        self._set("_memory", resolve_memory(memory, None))

    @property
    def backward_slices(self) -> int | str | None:
        """'auto' (a rerun that would hold more than the mode keeps beside it is sliced), a number of slices, or
        None."""
        return self._slices

    @backward_slices.setter
    def backward_slices(self, slices: int | str | None) -> None:
        check_slices(slices)
        self._set("_slices", slices)

    def __prepare_scriptable__(self) -> nn.Module:
        """torch.jit.script calls this first: say plainly that scripting is not supported."""
        raise RuntimeError(SCRIPTING_UNSUPPORTED)

    def _set(self, name: str, value: Any) -> None:
        for m in self.modules():
            if isinstance(m, MemoryMode):
                setattr(m, name, value)

    def slices(self, maps: Sequence[Tensor], transient: float = 3.0, keeps: float | None = None) -> int:
        """The slices of a rerun of ``maps`` whose backward holds ``transient`` times their bytes, in this mode; under
        'auto', where it would hold more than ``keeps`` times their bytes (what the mode keeps beside it; None:
        frugal's reruns only). A compiled model is not sliced: its graph is traced whole."""
        if self._slices is None or self._memory == "plain" or torch.compiler.is_compiling() or \
                self._slices == "auto" and (transient <= keeps if keeps is not None else self._memory != "frugal"):
            return 1  # answered before any tensor is read: efficient's layers and transitions ask on every forward
        reads = sum(t.numel() * t.element_size() for t in maps)
        return slice_count(self._slices, self._memory == "frugal", maps[0].shape[0], transient * reads, reads,
                           None if keeps is None else keeps * reads)

    def conv_slices(self, maps: Sequence[Tensor], widths: tuple[int, int], weight: float = 1.0) -> int:
        """:meth:`slices` of a transition's rerun over ``maps`` (norm, ReLU, a convolution of ``widths``, channels in
        and out, pool), weighed as a dense layer's, ``weight`` times: three times what it reads and what its
        convolution makes (frugal's reruns, under 'auto')."""
        inputs, outputs = widths
        return self.slices(maps, weight * 3 * (1 + outputs / inputs))
