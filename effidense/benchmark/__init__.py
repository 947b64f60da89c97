"""Side-by-side training-step benchmark of the memory modes, their compiled versions and the peers.

Every variant computes the same function: each is built fresh and loaded with one set of weights, and (before any
training) its eval-mode output is checked against the plain model's. A variant then runs warm-up steps, one step
under :class:`effidense.SavedTensorMeter` (activation memory) and on CUDA one step under
:func:`effidense.cuda_peak_bytes`. Then the variants take turns: each timed round runs one step of every variant, so
that a shared machine's drift weighs on all alike; medians are reported, and ratios to plain are medians of the
per-round ratios. A step is zero_grad, forward, cross-entropy loss and backward (no optimizer update, so every timed
step sees the same weights). ``--max-batch`` searches run last.

Variants: ``plain``, ``efficient``, ``frugal`` (our memory modes), ``tv`` (torchvision's DenseNet with
``memory_efficient=True``), ``timm`` (timm's DenseNet after ``set_grad_checkpointing()``), and any of them with a
``+compile`` suffix: the whole model compiled, always timed beside its eager self, so that the output says whether
compiling pays on the device. The peers exist only for configurations their DenseNet classes can build exactly (ImageNet
stem, bottleneck layers, compression 0.5; timm also needs ``num_init_features == 2 * growth_rate``), so e.g.
DenseNet-121/161/169/201/264 have both, the CIFAR nets have neither, and timm's ``densenet264d`` (deep stem) is not
a counterpart of anything here.

``tools/bench.py`` is the command-line front; :func:`run_benchmark` is the per-process core (DDP ranks call it too).

Where things live:

* :mod:`.variants` the variants (our modes, the torchvision/timm peers, ``+compile``) and building them
* :mod:`.config` :class:`BenchConfig`, :class:`VariantResult`, :class:`BenchReport` (the ratios to the references)
* :mod:`.trainer` one (timed) training step of one model, the progress bar, :func:`torch_threads`
* :mod:`.timing` the turn-taking rounds that time every variant
* :mod:`.cuda` GPU memory: :func:`is_oom` and the largest-batch search (:func:`largest_batch`)
* :mod:`.distributed` process groups, spawned DDP workers, merging results over ranks
* :mod:`.environment` versions, hardware and command line of a run
* :mod:`.report` the markdown table, the JSON document and the plot
* :mod:`.runner` :func:`run_benchmark` (one process), :func:`benchmark` (the whole run), the depth sweep
"""
from __future__ import annotations

from ..fileio import atomic_write_bytes
from .config import AMP_DTYPES, COMPILE_MODES, JSON_SCHEMA, BenchConfig, BenchReport, VariantResult, autocast, ratio
from .cuda import bisect_fits, cuda_fits, device_for_rank, is_oom, largest_batch, release
from .distributed import backend_for, check_world, free_port, process_group, torchrun_world
from .environment import TORCHRUN_ENV, command_line, environment
from .report import compile_verdicts, fmt, format_table, report_to_json, write_json, write_plot
from .runner import activation_floor, benchmark, memory_by_depth, run_benchmark
from .trainer import StepRunner, Timer, make_batch, step_loss, timed_step, torch_threads, training_step
from .variants import (
    COMPILE_SUFFIX,
    PEERS,
    build_variant,
    compile_model,
    input_shape,
    load_weights,
    parse_variants,
    peer_unsupported,
    size_label,
)

__all__ = [
    "input_shape", "load_weights", "size_label",
    "PEERS", "COMPILE_SUFFIX", "COMPILE_MODES", "AMP_DTYPES", "JSON_SCHEMA", "BenchConfig", "VariantResult",
    "BenchReport",
    "parse_variants", "peer_unsupported", "build_variant", "compile_model", "run_benchmark", "benchmark",
    "memory_by_depth", "activation_floor", "largest_batch", "bisect_fits", "is_oom", "release", "cuda_fits",
    "device_for_rank",
    "environment", "fmt", "compile_verdicts",
    "command_line", "TORCHRUN_ENV", "format_table", "report_to_json",
    "write_json", "write_plot", "torch_threads", "Timer", "StepRunner", "step_loss", "training_step", "timed_step",
    "make_batch", "free_port", "process_group", "torchrun_world", "backend_for",
    "check_world", "atomic_write_bytes", "autocast", "ratio",
]
