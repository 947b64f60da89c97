"""Gradients summed where a map's readers are, rather than by autograd; and maps read through their concatenation.

Autograd sums a map's gradient from every segment that read it, but only once a segment returns: while a dense layer's
backward runs, its new gradients for every map it read sit beside the sums so far, two sets of a block's map
gradients at once. A :class:`GradSlot` holds a map's sum instead: each reader adds its share (a sliced one a slice at
a time, in place), and the segment that made the map takes the sum when autograd reaches it, adding what autograd
summed from readers that do not gather (a checkpoint, a hook).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["GradSlot", "gathered", "read_through", "slot_of", "slots_of", "with_slot"]


class GradSlot:
    """One map's gradient sum (the module docstring). Only sliced frugal layers make slots: their gradients are
    already within the order of float sums of plain's, and the sum's order is then not autograd's. A slot filled in
    an earlier backward pass (one given up part-way) counts as empty."""

    __slots__ = ("grad", "task")

    def __init__(self) -> None:
        self.grad: Tensor | None = None
        self.task = None

    def held(self) -> Tensor | None:
        """The gradient summed so far in this backward pass, or None."""
        return self.grad if self.grad is not None and self.task == torch._C._current_graph_task_id() else None

    def hold(self, grad: Tensor) -> Tensor:
        """Hold ``grad`` as the sum so far (the first reader's, or a buffer the reader fills); returns it."""
        self.grad, self.task = grad, torch._C._current_graph_task_id()
        return grad

    def add(self, grad: Tensor) -> None:
        held = self.held()
        if held is None:
            self.hold(grad)
        else:
            held.add_(grad)

    def take(self, grad: Tensor | None) -> Tensor | None:
        """The map's whole gradient: what was gathered here plus ``grad``, what autograd summed from other readers."""
        held, self.grad = self.held(), None
        return grad if held is None else held if grad is None else held.add_(grad)


def slot_of(t: Tensor) -> GradSlot | None:
    """The slot where the gradient of map ``t`` is gathered, if its maker gathers."""
    return None if torch.compiler.is_compiling() else _own_slot(t)


def slots_of(maps: Sequence[Tensor]) -> tuple[GradSlot | None, ...]:
    """:func:`slot_of` each map (asked of every map a segment reads, on every forward)."""
    if torch.compiler.is_compiling() or not any([getattr(t, "_grad_slot", None) for t in maps]):
        return (None,) * len(maps)
    return tuple(map(_own_slot, maps))


def _own_slot(t: Tensor) -> GradSlot | None:
    held = getattr(t, "_grad_slot", None)
    # the map's own, not one copied onto what is computed from it (MONAI's MetaTensor copies its attributes so)
    return held[0] if held is not None and held[1] == id(t) else None


def with_slot(t: Tensor, slot: GradSlot) -> Tensor:
    """``t``, whose gradient is gathered in ``slot`` (set by the segment that made ``t``)."""
    t._grad_slot = slot, id(t)
    return t


class _Gathered(torch.autograd.Function):
    """The map itself (a view), whose gradient gathered in ``slot`` joins autograd's here."""

    @staticmethod
    def forward(ctx: Any, slot: GradSlot, x: Tensor) -> Tensor:
        ctx.slot = slot
        ctx.set_materialize_grads(False)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor | None) -> tuple[None, Tensor | None]:
        return None, ctx.slot.take(grad)


def gathered(x: Tensor) -> Tensor:
    """``x``, with a slot for its gradient: the maps a block reads from outside, where its layers gather."""
    if slot_of(x) is not None:
        return x
    slot = GradSlot()
    return with_slot(_Gathered.apply(slot, x), slot)


class _ReadThrough(torch.autograd.Function):
    """The maps themselves (views), whose gradients join in one for their concatenation, which passes them on."""

    @staticmethod
    def forward(ctx: Any, whole: Tensor, *maps: Tensor) -> tuple[Tensor, ...]:
        ctx.widths, ctx.dtype = [t.shape[1] for t in maps], whole.dtype
        ctx.set_materialize_grads(False)
        return tuple(t.view_as(t) for t in maps)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        nothing = (None,) * len(grads)
        like = next((g for g in grads if g is not None), None)
        if like is None:
            return None, *nothing
        grads = [g if g is not None else like.new_zeros((like.shape[0], width, *like.shape[2:]))
                 for g, width in zip(grads, ctx.widths, strict=True)]
        return torch.cat(grads, 1).to(ctx.dtype), *nothing


def read_through(whole: Tensor, maps: list[Tensor]) -> list[Tensor]:
    """``maps``, read through ``whole``, their concatenation that a hook saw: later readers' gradients reach them by
    way of ``whole``, so a hook on it (``whole.register_hook``) sees the gradient it would if they read ``whole``
    itself, while only the maps are kept. Nothing is kept for backward."""
    if not torch.is_grad_enabled() or not whole.requires_grad:
        return maps
    return list(_ReadThrough.apply(whole, *maps))
