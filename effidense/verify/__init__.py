"""Exactness checks: every memory mode (and compiled model) against the plain model, plus gradcheck and DDP.

The promise under test: ``efficient`` and ``frugal`` compute the plain model's function, including BatchNorm's
running statistics and ``num_batches_tracked``, which torchvision's and timm's checkpointed DenseNets update twice.

* :func:`compare_modes`: identical copies (non-default running stats set first) train ``steps`` SGD steps on the same
  batches with the same dropout seed; after every step outputs, loss, every parameter gradient and every buffer are
  compared with plain's, then parameters and an eval-mode forward/backward (input gradient included).
* :func:`autograd_gradcheck`: ``torch.autograd.gradcheck`` in float64 on a tiny model, with respect to the input and
  parameters inside recomputed segments, plus a random-direction derivative check that reports a difference.
* :func:`ddp_checks` (inside a process group): DDP gradients equal single-process gradients (train mode: the sum
  over per-rank shards, since BatchNorm's batch statistics are per rank; eval mode: the full batch at once), BN
  buffers equal the single-process ones of each rank's shard, every mode equals plain, and all ranks agree. With
  ``sync_bn`` the model's norms are ``nn.SyncBatchNorm``: train-mode gradients and BN buffers then equal those of
  the full batch at once.

Differences are relative: the largest ``|a - b|`` over the tensors of a check (e.g. all parameter gradients)
divided by the largest ``|b|`` among them; the tensor with the largest difference is named. Integer buffers
(``num_batches_tracked``) must match exactly. ``tools/gradcheck.py`` is the command-line front.

Where things live: :mod:`.core` (checks, settings, tolerances, tensor comparison), :mod:`.local` (mode comparisons
and gradcheck in one process), :mod:`.ddp` (DDP checks), :mod:`.report` (table and JSON).
"""
from __future__ import annotations

from .core import (
    GRADCHECK_TOLERANCES,
    MODE_CHECK_DESCRIPTIONS,
    SGD,
    TINY_BC,
    TINY_SMALL_INPUTS,
    Case,
    Check,
    VerifyConfig,
    compare_tensors,
    input_shape,
    tensor_diff,
    tolerance,
)
from .ddp import ddp_checks, run_ddp
from .local import autograd_gradcheck, compare_modes, default_cases, run_local_checks
from .report import checks_to_json, format_report

__all__ = ["Check", "Case", "VerifyConfig", "TINY_BC", "TINY_SMALL_INPUTS", "GRADCHECK_TOLERANCES", "SGD",
           "MODE_CHECK_DESCRIPTIONS", "tolerance", "tensor_diff", "default_cases", "compare_modes",
           "autograd_gradcheck", "ddp_checks", "run_local_checks", "run_ddp", "format_report", "checks_to_json",
           "compare_tensors", "input_shape"]
