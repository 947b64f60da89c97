"""Kernel scratch: memory a kernel allocates and frees inside itself, which no count of the tensors ops return sees.

A step's peak is the allocator's, and on the CPU three kinds of kernel that a DenseNet step calls take scratch beside
their outputs. Each model below was fitted to the CPU allocator's events (:func:`effidense.memory.cpu_peak_bytes`)
around the one kernel, over the shapes a DenseNet step gives it (docs/planner.md has the measurements):

* ``native_batch_norm_backward``: a temporary of the input's size whenever it forms the input's gradient.
* ``convolution`` and ``convolution_backward`` by oneDNN (torch's ``use_mkldnn`` rule, below): forward, the input and
  the weight reordered to oneDNN's blocked layout; backward, the output's gradient (made contiguous first when it
  is a view, as a concatenation's gradient is) and the larger of the input's reorder and the weight gradient's; with
  a plain input layout (a stem of 1 to 4 channels) the output (or its gradient) instead of the input. With more than
  one thread, each further thread sums a weight gradient of its own. The blocked layout pads channels to whole
  blocks (16 with AVX-512, 8 without): so does each reorder, and a forward whose output channels do not fill their
  blocks writes a padded output first.
* The native fallback (``slow_conv2d``, ``slow_conv3d``; a batch of 1 with small maps takes it even for 3x3 kernels):
  im2col's (vol2col's) columns for kernels larger than 1, the contiguous copy of a view's gradient; ``slow_conv3d``'s
  backward of a 1x1x1 kernel: the input's size less the weight's.

Not fitted: maps of 2 or fewer positions a side under a 3x3x3 kernel (oneDNN takes several weights' worth there),
bf16 and channels_last, which oneDNN reorders otherwise (channels_last not at all: the plan over-counts it).

On CUDA, cuDNN picks convolution algorithms whose workspace fits the free memory and reports none through torch's
tensors, and native BatchNorm's backward reduces per channel; neither is modelled, and the safety margin covers them
(docs/planner.md says how much).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch

from .budget import DEVICES

__all__ = ["DEVICES", "KERNEL_SCRATCH", "scratch_model"]

# What each device's model counts, for the report and the docs.
KERNEL_SCRATCH = {
    "cpu": "BatchNorm backward's input-sized temporary; oneDNN convolution's reorders (input, weight, output "
           "gradient) and its per-thread weight gradients; im2col's columns of the native fallback",
    "cuda": "none modelled: cuDNN's convolution workspace and BatchNorm's reserve are left to the safety margin",
}
PLAIN_SOURCE_CHANNELS = 4  # oneDNN keeps a first layer's few input channels in their plain layout

aten = torch.ops.aten


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@functools.cache
def _block() -> int:
    """Channels a block of oneDNN's blocked layout holds, to which it pads a tensor's channels."""
    return 16 if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else 8


def _blocked(t: torch.Tensor, dims: tuple[int, ...] = (1,)) -> int:
    """``t``'s bytes in oneDNN's blocked layout: its ``dims`` (channels; a weight's output and input channels) padded
    to whole blocks."""
    shape = list(t.shape)
    for d in dims:
        shape[d] = -(-shape[d] // _block()) * _block()
    return math.prod(shape) * t.element_size()


def _use_mkldnn(x: torch.Tensor, weight: torch.Tensor, stride: list[int], dilation: list[int], groups: int,
                threads: int) -> bool:
    """torch's rule (``ConvParams::use_mkldnn``) for a CPU convolution: oneDNN, or the native kernels, which are
    faster for 1x1 kernels on one thread and small batches."""
    if x.dtype in (torch.bfloat16, torch.float16):
        return True
    if x.dtype != torch.float32:
        return False
    one_by_one = weight.shape[-1] == 1 and weight.shape[-2] == 1
    first = any(s != 1 for s in stride) or any(d != 1 for d in dilation) or x.shape[0] >= 16 or not one_by_one \
        or threads > 1
    second = groups > 1 or (weight.shape[-1] > 3 and weight.shape[-2] > 3) or x.shape[0] > 1 \
        or math.prod(x.shape[:4]) > 20480
    return first and second


def _columns(x: torch.Tensor, weight: torch.Tensor, out_shape: torch.Size) -> int:
    """im2col's (vol2col's) buffer of the native kernels: every output position's receptive field."""
    if all(k == 1 for k in weight.shape[2:]):
        return 0
    return x.shape[0] * x.shape[1] * math.prod(weight.shape[2:]) * math.prod(out_shape[2:]) * x.element_size()


def _conv_forward(threads: int, args: tuple, out: torch.Tensor) -> int:
    x, weight, _, stride, _, dilation, transposed, _, groups = args[:9]
    if transposed:
        return 0
    if _use_mkldnn(x, weight, stride, dilation, groups, threads):
        if x.shape[1] <= PLAIN_SOURCE_CHANNELS:
            return _blocked(out)
        return _blocked(x) + _blocked(weight, (0, 1)) + _blocked(out) - _nbytes(out)
    return _columns(x, weight, out.shape)


def _conv_backward(threads: int, args: tuple, out: tuple) -> int:
    grad, x, weight, _, stride, _, dilation, transposed, _, groups, mask = args[:11]
    if transposed or not (mask[0] or mask[1]):
        return 0
    copy = 0 if grad.is_contiguous() else _nbytes(grad)  # a view's gradient is made contiguous first
    if _use_mkldnn(x, weight, stride, dilation, groups, threads):
        per_thread = (threads - 1) * _nbytes(weight) if mask[1] else 0
        if x.shape[1] <= PLAIN_SOURCE_CHANNELS:
            return copy + _blocked(grad) + per_thread + (_nbytes(x) if mask[0] else 0)
        # the input's reorder, or the weight gradient's where the weight is the larger (small maps); a weight
        # gradient whose channels do not fill their blocks is made padded first
        padding = _blocked(weight, (0, 1)) - _nbytes(weight) if mask[1] else 0
        return copy + max(_blocked(x), _blocked(weight, (0, 1))) + _blocked(grad) + per_thread + padding
    columns = _columns(x, weight, grad.shape)
    if columns or x.dim() == 4:
        return copy + columns
    return copy + (max(_nbytes(x) - _nbytes(weight), 0) if mask[0] else 0)


def _batch_norm_backward(threads: int, args: tuple, out: tuple) -> int:
    mask = args[9]
    return _nbytes(args[1]) if mask[0] else 0


def _positional(func: Any, args: tuple, kwargs: dict) -> tuple:
    """``args`` with the arguments given by name (or left to their defaults) appended in the schema's order."""
    if not kwargs:
        return args
    rest = func._schema.arguments[len(args):]
    return (*args, *(kwargs.get(a.name, a.default_value) for a in rest))


_CPU: dict[Any, Callable[[int, tuple, Any], int]] = {
    aten.native_batch_norm_backward.default: _batch_norm_backward,
    aten.convolution.default: _conv_forward,
    aten.convolution_backward.default: _conv_backward,
}


def scratch_model(device: str, threads: int | None = None) -> Callable[[Any, tuple, dict, Any], int] | None:
    """The scratch model of ``device`` ('cpu' or 'cuda'): a function of an op, its arguments and its outputs giving
    the bytes the kernel holds inside itself beside its outputs at its peak, or None where nothing is modelled.
    ``threads``: the CPU's torch threads (default: the current count)."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cuda":
        return None
    count = torch.get_num_threads() if threads is None else threads

    def scratch(func: Any, args: tuple, kwargs: dict, out: Any) -> int:
        model = _CPU.get(func)
        return 0 if model is None else model(count, _positional(func, args, kwargs), out)

    return scratch
