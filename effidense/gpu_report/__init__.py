"""The GPU evidence run: one command measures the whole matrix of issue 13 on a CUDA GPU.

Sections, most important first (each is written to ``DIR/report.json`` and ``DIR/summary.md`` as soon as it ends,
and the step-time section also after each of its cells, so a run cut short keeps what it measured):

1. ``step-time``: DenseNet-121, 224 px, batch 64 and 256, bf16 autocast and fp32 (TF32 on), channels_last on and
   off: step time, images/s and peak memory of torchvision (plain and ``memory_efficient=True``), timm
   (``set_grad_checkpointing()``), effidense plain / efficient / frugal and efficient compiled
   whole (``torch.compile``, what ``set_compile`` does in place). The compiled path runs in the first cell (bf16,
   channels_last, batch 64) and in a last fp32 cell, so that its compile time does not starve the eager cells.
2. ``max-batch``: largest batch (doubling, then bisection; only running out of memory counts as "does not fit") of
   DenseNet-121, 224 px, bf16, under a 12 GiB cap (``torch.cuda.set_per_process_memory_fraction``) and on the whole
   GPU.
3. ``seed``: the seed project's setting (DenseNet-BC (12,12,12), k=12, 32 px, batch 128, fp32, TF32 off): forward,
   backward and R = B/F beside its published 1080 Ti table, and the largest batch under the 12 GiB cap.
4. ``depth``: the deepest DenseNet-BC (k=12, 3 equal blocks, 32 px, batch 64) that trains one step under the cap,
   by bisection over the layers per block.
5. ``host-bound``: the fraction of a step the GPU is idle (torch.profiler: union of kernel intervals against the
   step's wall time) for efficient and its compiled path.
6. ``prediction``: the planner's (:func:`effidense.planner.plan`) predicted peak of each mode at two batch sizes
   against ``torch.cuda.max_memory_allocated`` of the same step, and its predicted largest batch under the 12 GiB cap
   against the max-batch section's measured one (goal: peaks within 10%).
7. ``correctness``: ``tools/gradcheck.py --device cuda`` and ``python -m pytest -m cuda`` as subprocesses.

Each section gets a share of ``--time-budget`` (time a section leaves unused passes to the later ones); a section
that runs out of time or fails is recorded as such, keeps its partial results, and the run goes on.

``--smoke`` runs the same code on the CPU with tiny models in well under two minutes: memory caps become byte budgets
on :class:`effidense.SavedTensorMeter`'s deterministic count (so both searches really bisect), the compiled paths use
the ``aot_eager`` backend (dynamo and AOT autograd without inductor's C++ build), the profiler records CPU activity,
and the correctness section runs gradcheck on the CPU and ``pytest -m cuda`` (whose tests skip without a GPU).
``effidense.cli.gpu_report`` is the command-line front. Modules: :mod:`.plan` (sections, variants, goals, the
published figures, the GPU and smoke plans), :mod:`.prediction` (section 6), :mod:`.steps` (building variants,
timing a step), :mod:`.state` (a run's clock, budget shares and report), :mod:`.sections` (the sections and their
goals), :mod:`.run` (running them in
order), :mod:`.summary` (the markdown).
"""
from .plan import (
           REPORT_JSON,
           SECTIONS,
           SUMMARY_MD,
           VARIANTS,
           Cap,
           Cell,
           GiB,
           OutOfTime,
           Plan,
           depth_spec,
           gpu_plan,
           smoke_plan,
)
from .run import run_report
from .sections import busy_time, search
from .steps import build_model
from .summary import format_summary

__all__ = ["SECTIONS", "VARIANTS", "Plan", "Cell", "Cap", "OutOfTime", "gpu_plan", "smoke_plan", "run_report",
           "format_summary", "busy_time", "search", "depth_spec", "build_model", "GiB", "REPORT_JSON", "SUMMARY_MD"]
