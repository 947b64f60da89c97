"""The GPU evidence run: bench, the planner's prediction and gradcheck, composed into one command on a CUDA GPU.

Sections, most important first (each is written to ``DIR/report.json`` and ``DIR/summary.md`` as soon as it ends,
so a run cut short keeps what it measured):

1. ``step-time``: ``effidense bench`` of DenseNet-121, 224 px, batch 64, bf16, channels_last: torchvision (plain and
   ``memory_efficient=True``), timm (``set_grad_checkpointing()``), effidense plain / efficient / frugal and
   efficient compiled whole, side by side.
2. ``max-batch``: ``effidense bench --max-batch``: the largest batch of each mode and torchvision's on the whole GPU.
3. ``prediction``: ``effidense plan --check``: the planner's predicted peak of each eager variant against
   ``torch.cuda.max_memory_allocated`` of the same step (the harness's one training step).
4. ``3d``: ``effidense bench --spatial-dims 3`` of our modes against MONAI's DenseNet on 96^3 volumes.
5. ``correctness``: ``effidense gradcheck --device cuda`` and ``python -m pytest -m cuda``.

The commands run as subprocesses, each with its ``--json`` beside the report; each section gets a share of
``--time-budget`` (time a section leaves unused passes to the later ones); a section that runs out of time or fails
is recorded as such and the run goes on.

``--smoke`` runs the same code on the CPU with a tiny model in about two minutes: no compiled variant and no
largest-batch search (which needs a GPU's memory), the "measured" peak counted on real CPU tensors, gradcheck on the
CPU, ``pytest -m cuda`` skipping without a GPU. ``effidense.cli.gpu_report`` is the command-line front. Modules:
:mod:`.plan` (sections, commands, the GPU and smoke plans), :mod:`.run` (running them), :mod:`.summary` (markdown).
"""
from .plan import EAGER, REPORT_JSON, SECTIONS, SUMMARY_MD, VARIANTS, OutOfTime, Plan, gpu_plan, smoke_plan
from .run import SECTION_RUNNERS, Run, run_report
from .summary import format_summary

__all__ = ["SECTIONS", "VARIANTS", "EAGER", "Plan", "OutOfTime", "gpu_plan", "smoke_plan", "run_report", "Run",
           "SECTION_RUNNERS", "format_summary", "REPORT_JSON", "SUMMARY_MD"]
