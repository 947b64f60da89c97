"""Fake kernels' answers remembered across batch sizes: what makes the planner's steps after the first quick.

A step on fake tensors works out each kernel's output sizes, strides and dtype in Python. ``FakeTensorMode`` keeps
those answers, but keyed by every size, so each new batch size misses them all, and BatchNorm's kernels (worked out
by running Python decompositions) are never kept. The planner runs the same step at several batch sizes, in which
the same kernels meet the same shapes but for the batch.

:class:`BatchFreeShapes` remembers the outputs of the kernels listed in :data:`KERNELS` by their inputs with the
batch size left out, and answers a later call at any other batch with empty tensors of the remembered layout. That
holds where the batch is unambiguous: it is the first dim of the first input; every input and output whose first
dim it is keeps its samples outermost in memory (so no other stride depends on it); and it appears nowhere else, in
no other dim and no other argument. Any other call, and any kernel not listed, goes to the fake kernel as before.
Each listed kernel makes fresh outputs (no view, no in-place write) whose dims are copies of its inputs' dims or
depend on other dims only.
"""
from __future__ import annotations

from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["KERNELS", "WRITING", "BatchFreeShapes"]

aten = torch.ops.aten

KERNELS = frozenset({
    aten.native_batch_norm.default, aten.native_batch_norm_backward.default,
    aten.convolution.default, aten.convolution_backward.default,
    aten._to_copy.default, aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor,
    aten.sum.dim_IntList, aten.relu.default, aten.threshold_backward.default, aten.cat.default,
    aten.max_pool2d_with_indices.default, aten.max_pool2d_with_indices_backward.default,
    aten.max_pool3d_with_indices.default, aten.max_pool3d_with_indices_backward.default,
    aten.avg_pool2d.default, aten.avg_pool2d_backward.default, aten.avg_pool3d.default,
    aten.avg_pool3d_backward.default, aten.native_dropout.default, aten.native_dropout_backward.default,
})


# Kernels that write into a tensor they are given and return it: remembered only as having worked on these inputs.
WRITING = {aten.mul_.Tensor: "self", aten.sub_.Tensor: "self", aten.add_.Tensor: "self", aten.div_.Tensor: "self",
           aten.relu_.default: "self", aten.copy_.default: "self", aten.threshold_backward.grad_input: "grad_input",
           aten.sub.out: "out", aten.add.out: "out", aten.mul.out: "out"}


class _Ambiguous(Exception):
    """The batch cannot be told apart in this call."""


def _outermost(t: torch.Tensor) -> bool:
    return t.dim() < 2 or t.stride(0) >= max(s * n for s, n in zip(t.stride()[1:], t.shape[1:], strict=True))


def _key(value: Any, batch: int) -> Any:
    """``value`` described without the batch size: a tensor by its layout, with ``True`` where its first dim is it."""
    if isinstance(value, torch.Tensor):
        if not isinstance(value, FakeTensor) or value.constant is not None or batch in value.shape[1:]:
            raise _Ambiguous
        first = value.dim() > 0 and value.shape[0] == batch
        if first and not _outermost(value):
            raise _Ambiguous
        return (first, tuple(value.shape[1:] if first else value.shape), value.stride(), value.dtype, value.layout,
                value.device)
    if isinstance(value, (list, tuple)):
        return type(value), tuple(_key(v, batch) for v in value)
    if isinstance(value, dict):
        return tuple((name, _key(v, batch)) for name, v in sorted(value.items()))
    if isinstance(value, bool) or value is None or isinstance(value, (float, str, torch.dtype, torch.device,
                                                                      torch.memory_format, torch.layout)):
        return value
    if isinstance(value, int) and value != batch:
        return value
    raise _Ambiguous


def _batch_of(args: tuple) -> int:
    for value in args:
        if isinstance(value, torch.Tensor):
            if value.dim() == 0:
                break
            return value.shape[0]
        if isinstance(value, (list, tuple)) and value and isinstance(value[0], torch.Tensor):
            return _batch_of(tuple(value))
    raise _Ambiguous


def _concatenates_samples(func: Any, args: tuple, kwargs: dict) -> bool:
    if func is not aten.cat.default:
        return False
    dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
    return not args[0] or dim % max(args[0][0].dim(), 1) == 0  # an empty list is torch's to refuse


class BatchFreeShapes(TorchDispatchMode):
    """Answers :data:`KERNELS` on fake tensors from what the same call at another batch size gave (the module
    docstring). Entered inside ``FakeTensorMode``; what it remembers is shared by every instance, as fake tensors'
    own cache is."""

    remembered: dict[Any, Any] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func not in KERNELS and func not in WRITING or _concatenates_samples(func, args, kwargs):
            return func(*args, **kwargs)
        try:
            batch = _batch_of(args)
            if batch < 2:  # a batch of one leaves its stride free
                raise _Ambiguous
            key = func, _key(args, batch), _key(kwargs, batch)
            written = _written(func, args, kwargs) if func in WRITING else None
        except _Ambiguous:
            return func(*args, **kwargs)
        layouts = self.remembered.get(key)
        if layouts is not None:
            return written if written is not None else _made(layouts, batch)
        before = None if written is None else _key(written, batch)
        out = func(*args, **kwargs)
        try:
            if written is not None:  # remembered where it wrote in place, not where it resized what it wrote into
                if out is written and _key(written, batch) == before:
                    self.remembered[key] = True
            else:
                self.remembered[key] = _layouts(out, batch)
        except _Ambiguous:
            pass
        return out


def _written(func: Any, args: tuple, kwargs: dict) -> torch.Tensor:
    """The tensor a :data:`WRITING` kernel writes into and returns."""
    name = WRITING[func]
    return args[0] if name == "self" else kwargs[name]


def _layouts(out: Any, batch: int) -> Any:
    if isinstance(out, tuple):
        return tuple(_layouts(t, batch) for t in out)
    if out is None:
        return None
    if not isinstance(out, torch.Tensor):
        raise _Ambiguous
    return _key(out, batch)


def _made(layouts: Any, batch: int) -> Any:
    if isinstance(layouts, tuple) and (not layouts or not isinstance(layouts[0], bool)):
        return tuple(_made(layout, batch) for layout in layouts)
    if layouts is None:
        return None
    first, shape, stride, dtype, layout, device = layouts
    return torch.empty_strided((batch, *shape) if first else shape, stride, dtype=dtype, layout=layout, device=device)
