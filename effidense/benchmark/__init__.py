"""Side-by-side training-step benchmark of the memory modes, their compiled versions and the peers.

Every variant computes the same function: each is built fresh and loaded with one set of weights, and (before any
training) its eval-mode output is checked against the plain model's. A variant then runs warm-up steps, one step
under :class:`effidense.SavedTensorMeter` (activation memory) and on CUDA one step under
:func:`effidense.cuda_peak_bytes`. Then the variants take turns: each timed round runs one step of every variant, so
that a shared machine's drift weighs on all alike; medians are reported, and ratios to plain are medians of the
per-round ratios. A step is the tools' one training step (:func:`effidense.harness.training_step`) without the
optimizer update, so every timed step sees the same weights. ``--max-batch`` searches run last.

Variants: ``plain``, ``efficient``, ``frugal`` (our memory modes), ``tv`` (torchvision's DenseNet with
``memory_efficient=True``), ``timm`` (timm's DenseNet after ``set_grad_checkpointing()``), and any of them with a
``+compile`` suffix: the whole model compiled, always timed beside its eager self, so that the output says whether
compiling pays on the device. The peers exist only for configurations their DenseNet classes can build exactly (ImageNet
stem, bottleneck layers, compression 0.5; timm also needs ``num_init_features == 2 * growth_rate``), so e.g.
DenseNet-121/161/169/201/264 have both, the CIFAR nets have neither, and timm's ``densenet264d`` (deep stem) is not
a counterpart of anything here.

With ``BenchConfig.builders`` the variants are instead what a mapping builds by name, for a model no DenseNet peer
builds: ``effidense bench --model fcdensenet103`` times an FC-DenseNet's memory modes beside ``reference``, the port
:func:`effidense.harness.tiramisu.segmentation_variants` builds.

``tools/bench.py`` is the command-line front; :func:`run_benchmark` is the per-process core (DDP ranks call it too).
The variants, the step and the environment are :mod:`effidense.harness`'s, shared with plan, gradcheck and gpu-report.

Where things live:

* :mod:`.config` :class:`BenchConfig`, :class:`VariantResult`, :class:`BenchReport` (the ratios to the references)
* :mod:`.timing` the steps of one model (:class:`StepRunner`) and the turn-taking rounds that time every variant
* :mod:`.cuda` the largest-batch probe on a GPU and the device of each rank
* :mod:`.distributed` spawned DDP workers, merging results over ranks
* :mod:`.report` the markdown table, the JSON document and the plot
* :mod:`.runner` :func:`run_benchmark` (one process), :func:`benchmark` (the whole run), the depth sweep
"""
from __future__ import annotations

from .config import COMPILE_MODES, JSON_SCHEMA, BenchConfig, BenchReport, VariantResult, ratio
from .cuda import cuda_fits, device_for_rank, is_oom
from .report import compile_verdicts, fmt, format_table, report_to_json, write_json, write_plot
from .runner import activation_floor, benchmark, memory_by_depth, run_benchmark
from .timing import StepRunner

__all__ = [
    "COMPILE_MODES", "JSON_SCHEMA", "BenchConfig", "VariantResult", "BenchReport", "run_benchmark", "benchmark",
    "memory_by_depth", "activation_floor", "is_oom", "cuda_fits", "device_for_rank", "fmt", "compile_verdicts",
    "format_table", "report_to_json", "write_json", "write_plot", "StepRunner", "ratio",
]
