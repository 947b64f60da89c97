"""Will it fit? Predict a training step's peak memory and the largest batch for a GPU, without the GPU.

:func:`plan` builds each variant (the harness's names: our memory modes and the torchvision/timm peers) on tensors
that allocate nothing (``FakeTensorMode`` on the CPU) and runs the tools' one training step under
:class:`effidense.memory.StorageTracker`, which counts every live storage as ops make and free them, backward and
checkpoint recomputation included (:class:`effidense.harness.StepProbe`). The peak of a step is affine in the batch
(convex in general), so two steps give the line and a third confirms the largest batch that fits the budget; for 3D
inputs the largest cube edge at the given batch is searched too. Saved activations are the meter's count. On the CPU
the scratch that kernels take inside themselves is modelled (:mod:`.scratch`); on CUDA what the context, library
workspaces and the allocator add is not counted (:data:`NOT_COUNTED`). A safety margin of the budget is held back
(:data:`DEFAULT_MARGINS`: 5% on CUDA, 1% on the CPU). ``plan(..., measure=True)`` (``effidense plan --check``) runs
one real step of each variant and records the allocator's peak beside the prediction.

Modules: :mod:`.budget` (sizes, GPU presets, devices, margins; torch-free), :mod:`.core` (:func:`plan` and the
searches), :mod:`.scratch` (kernel scratch), :mod:`.workers` (variants planned side by side in spawned processes),
:mod:`.report` (tables, JSON schema ``effidense.plan/1``, plot).
``effidense plan`` is the command (:mod:`effidense.cli.plan`).
"""
from __future__ import annotations

from ..lazy import lazy_exports
from .budget import DEFAULT_MARGIN, DEFAULT_MARGINS, DEVICES, GPU_PRESETS, format_bytes, parse_budget

# name -> the submodule that defines it, imported on first use: the budget's names need no torch, so that the command
# reads (and refuses) a budget before loading it
_LAZY = {
    **dict.fromkeys(["DTYPES", "NOT_COUNTED", "BudgetError", "PlanReport", "VariantPlan", "plan", "search_batch",
                     "search_edge"], "core"),
    **dict.fromkeys(["JSON_SCHEMA", "PLOT_FORMATS", "format_check", "format_table", "recommendation",
                     "report_to_json", "write_json", "write_plot"], "report"),
    "scratch_model": "scratch",
}

__all__ = ["plan", "PlanReport", "VariantPlan", "BudgetError", "DEFAULT_MARGIN", "DEFAULT_MARGINS", "DEVICES",
           "GPU_PRESETS", "DTYPES", "NOT_COUNTED", "JSON_SCHEMA", "PLOT_FORMATS", "parse_budget", "format_bytes",
           "format_table", "format_check", "recommendation", "report_to_json", "write_json", "write_plot",
           "search_batch", "search_edge", "scratch_model"]


__getattr__ = lazy_exports(__name__, _LAZY)
