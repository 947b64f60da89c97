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
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .benchmark import (
    AMP_DTYPES,
    COMPILE_SUFFIX,
    atomic_write_bytes,
    backend_for,
    check_world,
    compile_model,
    free_port,
    process_group,
)
from .densenet import MEMORY_MODES
from .modelspec import ModelSpec

__all__ = ["Check", "Case", "VerifyConfig", "TINY_BC", "TINY_SMALL_INPUTS", "tolerance", "tensor_diff",
           "default_cases", "compare_modes", "autograd_gradcheck", "ddp_checks", "run_local_checks", "run_ddp",
           "format_report", "checks_to_json"]

# Tiny default models: one DenseNet-BC with the ImageNet stem, one plain DenseNet with the small-input stem.
TINY_BC = ModelSpec("tiny DenseNet-BC", dict(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2,
                                             num_classes=5))
TINY_SMALL_INPUTS = ModelSpec("tiny DenseNet, small inputs", dict(
    growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=None, compression=1.0, small_inputs=True,
    num_classes=5))
_GRADCHECK_MODEL = ModelSpec("gradcheck DenseNet-BC", dict(
    growth_rate=2, block_config=(1, 1), num_init_features=4, bn_size=2, small_inputs=True, num_classes=3))
GRADCHECK_TOLERANCES = dict(eps=1e-6, atol=1e-5, rtol=1e-3)
SGD = dict(lr=0.1, momentum=0.9)


@dataclass
class Check:
    """One comparison. ``tol`` is the relative tolerance (0 for exact); ``passed`` is the verdict."""

    group: str
    case: str
    subject: str
    what: str
    passed: bool
    max_abs: float | None = None
    max_rel: float | None = None
    tol: float | None = None
    detail: str = ""


@dataclass(frozen=True)
class Case:
    """Settings one mode comparison runs under."""

    name: str
    spec: ModelSpec
    dtype: torch.dtype = torch.float32
    channels_last: bool = False
    drop_rate: float = 0.0
    amp: str | None = None
    cumulative_bn: bool = False  # BatchNorm momentum=None: running stats are cumulative averages
    with_compiled: bool = False  # whether compiled variants join this case (when compiling at all)

    @property
    def label(self) -> str:
        return f"{self.spec.name} / {self.name}"


@dataclass
class VerifyConfig:
    """What ``tools/gradcheck.py`` checks."""

    specs: list[ModelSpec] = field(default_factory=lambda: [TINY_BC, TINY_SMALL_INPUTS])
    device: str = "cpu"
    steps: int = 2
    batch_size: int = 4
    img_size: int = 32
    seed: int = 0
    compile: bool = False
    amp: str = "bf16"
    modes: bool = True
    gradcheck: bool = True

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 2 or self.img_size < 1:
            raise ValueError(f"need steps >= 1, batch_size >= 2 (BatchNorm), img_size >= 1; got steps={self.steps}, "
                             f"batch_size={self.batch_size}, img_size={self.img_size}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.amp not in AMP_DTYPES:
            raise ValueError(f"amp must be one of {', '.join(AMP_DTYPES)}, got {self.amp!r}")


def tolerance(dtype: torch.dtype, device: str, amp: str | None = None, compiled: bool = False) -> float:
    """Relative tolerance for one comparison.

    The eager modes run the same kernels on the same values, so they usually agree bitwise; the tolerance only
    admits a different summation order of gradient contributions. On a GPU atomics and reduction order add a
    little more; compiled graphs fuse and reorder (inductor), and autocast rounds to 8 (bf16) or 11 (fp16) bits.
    """
    if amp is not None:
        tol = 2e-2 if amp == "bf16" else 5e-3
    elif dtype == torch.float64:
        tol = 1e-12
    else:
        tol = 1e-6 if device == "cpu" else 1e-5
    if compiled:
        tol = max(tol, 1e-9 if dtype == torch.float64 and amp is None else 1e-4)
    return tol


def tensor_diff(a: Tensor, b: Tensor) -> tuple[float, float]:
    """(max |a - b|, max |b|) in float64; a NaN on one side only, or a shape mismatch, is an infinite difference."""
    if a.shape != b.shape:
        return math.inf, 0.0
    if a.numel() == 0:
        return 0.0, 0.0
    a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
    nan_a, nan_b = a64.isnan(), b64.isnan()
    if not torch.equal(nan_a, nan_b):
        return math.inf, 0.0
    a64, b64 = a64.masked_fill(nan_a, 0), b64.masked_fill(nan_b, 0)
    return (a64 - b64).abs().max().item(), b64.abs().max().item()


def _compare(group: str, case: str, subject: str, what: str, got: dict[str, Tensor | None],
             expected: dict[str, Tensor | None], tol: float) -> Check:
    """One check over many named tensors (e.g. every parameter gradient).

    The relative difference is the largest absolute difference over all tensors divided by the largest magnitude
    over all reference tensors: a per-tensor ratio would flag noise in gradients that cancel to almost nothing
    (e.g. the scale of a BatchNorm followed by another BatchNorm). Integer tensors must be identical.
    """
    worst_abs, scale = 0.0, 0.0
    worst_name = ""
    problems = []
    for name in sorted(set(got) | set(expected)):
        a, b = got.get(name), expected.get(name)
        if (a is None) != (b is None):
            problems.append(f"{name}: {'missing' if a is None else 'unexpected'}")
            continue
        if a is None or b is None:
            continue
        if not (a.is_floating_point() or a.is_complex()):
            if not torch.equal(a.cpu(), b.cpu()):
                problems.append(f"{name}: {a.tolist() if a.numel() == 1 else '...'} != "
                                f"{b.tolist() if b.numel() == 1 else '...'}")
                worst_abs, worst_name = max(worst_abs, math.inf), worst_name or name
            continue
        max_abs, magnitude = tensor_diff(a, b)
        scale = max(scale, magnitude)
        if max_abs > worst_abs:
            worst_abs, worst_name = max_abs, name
    worst_rel = worst_abs / scale if scale > 0 else (0.0 if worst_abs == 0 else math.inf)
    passed = not problems and worst_rel <= tol
    n = len(expected)
    detail = f"{n} tensor{'s' if n != 1 else ''}"
    if worst_abs == 0 and not problems:
        detail += ", bitwise equal"
    elif worst_name and not problems:
        detail += f", largest difference in {worst_name}"
    if problems:
        detail += "; " + "; ".join(problems[:2]) + (f"; and {len(problems) - 2} more" if len(problems) > 2 else "")
    return Check(group, case, subject, what, passed, worst_abs, worst_rel, tol, detail)


def _batch_norms(model: nn.Module) -> Iterator[nn.modules.batchnorm._BatchNorm]:
    return (m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))


def _perturb_running_stats(model: nn.Module, seed: int) -> None:
    """Non-default running statistics, so an extra or missing update shows in every buffer."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in _batch_norms(model):
            bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=generator) * 0.5)
            bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=generator) * 1.5 + 0.5)
            bn.num_batches_tracked.fill_(7)


def _underlying(model: nn.Module) -> nn.Module:
    """The module whose parameters a wrapper (torch.compile, DDP) trains."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None:
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _grads(model: nn.Module) -> dict[str, Tensor | None]:
    return {n: None if p.grad is None else p.grad.detach().clone() for n, p in _underlying(model).named_parameters()}


def _params(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in _underlying(model).named_parameters()}


def _buffers(model: nn.Module, integer: bool) -> dict[str, Tensor]:
    return {n: b.detach().clone() for n, b in _underlying(model).named_buffers()
            if b.is_floating_point() != integer}


def _autocast(device: torch.device, amp: str | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp]) if amp else contextlib.nullcontext()


def _batch(spec: ModelSpec, batch: int, img: int, dtype: torch.dtype, device: torch.device, seed: int,
           channels_last: bool = False) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, spec.arg("in_chans"), img, img, generator=generator, dtype=dtype)
    y = torch.randint(0, max(spec.arg("num_classes"), 1), (batch,), generator=generator)
    x = x.to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device)


def _set_deterministic(device: torch.device) -> None:
    # Exactness is about the model, not about kernels that may pick a different algorithm or precision per call.
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


def default_cases(specs: Sequence[ModelSpec], amp: str = "bf16") -> list[Case]:
    """The first spec under every setting, the others under the basic ones."""
    cases: list[Case] = []
    for i, spec in enumerate(specs):
        # Compiled copies (regional: set_compile compiles the BN-ReLU segments, dropout stays eager) join the fp32
        # and dropout cases; each case compiles them afresh, so the other cases leave them out.
        cases += [Case("fp32", spec, with_compiled=i == 0),
                  Case("dropout 0.2", spec, drop_rate=0.2, with_compiled=i == 0),
                  Case("BN momentum=None", spec, cumulative_bn=True)]
        if i == 0:
            cases += [Case("channels_last", spec, channels_last=True),
                      Case("fp64", spec, dtype=torch.float64),
                      Case(f"autocast {amp}", spec, amp=amp)]
    return cases


def compare_modes(case: Case, variants: Sequence[str], steps: int, batch_size: int, img_size: int,
                  device: str | torch.device = "cpu", seed: int = 0) -> list[Check]:
    """Train plain and every variant side by side for ``steps`` SGD steps; compare everything with plain's."""
    device = torch.device(device)
    _set_deterministic(device)

    def build(variant: str) -> nn.Module:
        mode = variant.removesuffix(COMPILE_SUFFIX)
        model = case.spec.build(mode, drop_rate=case.drop_rate)
        if case.cumulative_bn:
            for bn in _batch_norms(model):
                bn.momentum = None
        model.load_state_dict(state)
        model.to(device=device, dtype=case.dtype)
        if case.channels_last:
            model.to(memory_format=torch.channels_last)
        return compile_model(model) if variant.endswith(COMPILE_SUFFIX) else model

    torch.manual_seed(seed)
    reference = case.spec.build("plain", drop_rate=case.drop_rate)
    _perturb_running_stats(reference, seed)
    state = copy.deepcopy(reference.state_dict())
    names = ["plain", *[v for v in variants if v != "plain"]]
    models = {v: build(v) for v in names}
    optimizers = {v: torch.optim.SGD(m.parameters(), **SGD) for v, m in models.items()}
    checks: list[Check] = []

    def record(model: nn.Module, x: Tensor, y: Tensor, step_seed: int) -> dict[str, Any]:
        torch.manual_seed(step_seed)  # the same dropout masks in every variant
        with _autocast(device, case.amp):
            out = model(x)
        loss = F.cross_entropy(out.float(), y)
        loss.backward()
        return {"output": {"output": out.detach().clone()}, "loss": {"loss": loss.detach().clone()},
                "grads": _grads(model), "stats": _buffers(model, integer=False),
                "counts": _buffers(model, integer=True)}

    per_step: dict[str, dict[str, list[Check]]] = {v: {k: [] for k in _TRAIN_CHECKS} for v in names[1:]}
    for step in range(steps):
        x, y = _batch(case.spec, batch_size, img_size, case.dtype, device, seed + 1 + step, case.channels_last)
        results = {}
        for v, model in models.items():
            model.train()
            optimizers[v].zero_grad(set_to_none=True)
            results[v] = record(model, x, y, seed + 1000 + step)
            optimizers[v].step()
        for v in names[1:]:
            tol = tolerance(case.dtype, device.type, case.amp, v.endswith(COMPILE_SUFFIX))
            for key, label in _TRAIN_CHECKS.items():
                check = _compare("modes", case.label, v, label, results[v][key], results["plain"][key],
                                 0.0 if key == "counts" else tol)
                per_step[v][key].append(replace(check, detail=f"step {step + 1}: {check.detail}"))
    for v in names[1:]:
        checks += [_worst(found) for found in per_step[v].values()]

    x, y = _batch(case.spec, batch_size, img_size, case.dtype, device, seed + 999, case.channels_last)
    x.requires_grad_(True)
    final = {}
    for v, model in models.items():
        params = _params(model)
        model.eval()
        optimizers[v].zero_grad(set_to_none=True)
        x.grad = None
        with _autocast(device, case.amp):
            out = model(x)
        F.cross_entropy(out.float(), y).backward()
        final[v] = {"params": params, "eval output": {"output": out.detach().clone()},
                    "eval grads": {**_grads(model), "input": x.grad.detach().clone()},
                    "eval buffers": _buffers(model, integer=False) | _buffers(model, integer=True)}
    for v in names[1:]:
        tol = tolerance(case.dtype, device.type, case.amp, v.endswith(COMPILE_SUFFIX))
        for key, label in _FINAL_CHECKS.items():
            checks.append(_compare("modes", case.label, v, label, final[v][key], final["plain"][key], tol))
    return checks


# Short names: they are the columns of the report's mode table.
_TRAIN_CHECKS = {"output": "output", "loss": "loss", "grads": "grads", "stats": "BN stats",
                 "counts": "BN count"}
_FINAL_CHECKS = {"params": "params", "eval output": "eval output", "eval grads": "eval grads",
                 "eval buffers": "eval buffers"}
MODE_CHECK_DESCRIPTIONS = {
    "output": "train-mode logits at every step",
    "loss": "cross-entropy loss at every step",
    "grads": "every parameter gradient at every step",
    "BN stats": "BN running_mean/running_var after every step",
    "BN count": "BN num_batches_tracked after every step, must be identical",
    "params": "parameters after the SGD steps",
    "eval output": "eval-mode logits after training",
    "eval grads": "eval-mode gradients of parameters and input",
    "eval buffers": "buffers after the eval pass (counts identical)",
}


def _worst(checks: Sequence[Check]) -> Check:
    """One check for a comparison repeated over steps: failed if any failed, the worst step's numbers."""
    worst = max(checks, key=lambda c: (not c.passed, c.max_rel or 0.0, c.max_abs or 0.0))
    if all(c.max_abs == 0 and c.passed for c in checks):
        worst = replace(worst, detail=f"{len(checks)} step{'s' if len(checks) > 1 else ''}: "
                                      f"{worst.detail.split(': ', 1)[-1]}")
    return replace(worst, passed=all(c.passed for c in checks))


def autograd_gradcheck(memory: str, device: str | torch.device = "cpu", seed: int = 0) -> list[Check]:
    """``torch.autograd.gradcheck`` in float64 (train mode, input and two parameters inside recomputed segments),
    and a random-direction check that reports how far the analytical derivative is from central differences."""
    device = torch.device(device)
    _set_deterministic(device)
    torch.manual_seed(seed)
    model = _GRADCHECK_MODEL.build(memory).to(device=device, dtype=torch.float64).train()
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 6, 6, generator=generator, dtype=torch.float64).to(device).requires_grad_(True)
    # gradcheck perturbs its inputs in place, so passing the parameters themselves checks their gradients.
    weight = model.features.denseblock2.denselayer1.conv1.weight
    norm = model.features.denseblock1.denselayer1.norm1.weight
    inputs = (x, weight, norm)

    def fn(x: Tensor, *params: Tensor) -> Tensor:
        return model(x)

    label = f"{_GRADCHECK_MODEL.name} / float64, train mode"
    subject = f"{memory}"
    tols = GRADCHECK_TOLERANCES
    try:
        # GPU backward kernels may add with atomics (different rounding per call); the CPU must be deterministic.
        torch.autograd.gradcheck(fn, inputs, eps=tols["eps"], atol=tols["atol"], rtol=tols["rtol"],
                                 nondet_tol=0.0 if device.type == "cpu" else 1e-10)
        verdict = Check("gradcheck", label, subject, "torch.autograd.gradcheck (input, conv1 and norm1 weights)",
                        True, tol=tols["rtol"], detail=f"eps {tols['eps']:g}, atol {tols['atol']:g}, "
                                                       f"rtol {tols['rtol']:g}")
    except Exception as error:  # gradcheck raises GradcheckError; anything else is a failure just the same
        first = str(error).strip().splitlines()
        verdict = Check("gradcheck", label, subject, "torch.autograd.gradcheck (input, conv1 and norm1 weights)",
                        False, tol=tols["rtol"], detail=f"{type(error).__name__}: {first[0] if first else ''}")

    # Directional derivative: u . (f(p + e v) - f(p - e v)) / 2e  against  <grad of u . f(p), v>.
    worst_abs = worst_rel = 0.0
    eps = 1e-6
    for _ in range(4):
        directions = [torch.randn(t.shape, generator=generator, dtype=torch.float64).to(device) for t in inputs]
        u = torch.randn(fn(*inputs).shape, generator=generator, dtype=torch.float64).to(device)
        grads = torch.autograd.grad((fn(*inputs) * u).sum(), inputs)
        analytical = sum((g * v).sum() for g, v in zip(grads, directions, strict=True)).item()
        with torch.no_grad():
            for t, v in zip(inputs, directions, strict=True):
                t.add_(v, alpha=eps)
            plus = (fn(*inputs) * u).sum().item()
            for t, v in zip(inputs, directions, strict=True):
                t.add_(v, alpha=-2 * eps)
            minus = (fn(*inputs) * u).sum().item()
            for t, v in zip(inputs, directions, strict=True):
                t.add_(v, alpha=eps)
        numerical = (plus - minus) / (2 * eps)
        diff = abs(numerical - analytical)
        worst_abs = max(worst_abs, diff)
        worst_rel = max(worst_rel, diff / max(abs(numerical), 1e-12))
    directional = Check("gradcheck", label, subject, "random-direction derivative vs central differences",
                        worst_rel <= tols["rtol"], worst_abs, worst_rel, tols["rtol"], f"4 directions, eps {eps:g}")
    return [verdict, directional]


def run_local_checks(cfg: VerifyConfig, progress: bool = False) -> list[Check]:
    """Every single-process check ``cfg`` asks for."""
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA device")
    variants = [m for m in MEMORY_MODES if m != "plain"]
    compiled = [m + COMPILE_SUFFIX for m in MEMORY_MODES] if cfg.compile else []
    jobs: list[tuple[str, Any]] = []
    if cfg.modes:
        jobs += [("modes", c) for c in default_cases(cfg.specs, cfg.amp)]
    if cfg.gradcheck:
        jobs += [("gradcheck", m) for m in MEMORY_MODES]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc="gradcheck", unit="check", file=sys.stderr, dynamic_ncols=True)
    checks: list[Check] = []
    try:
        for kind, job in jobs:
            if bar is not None:
                bar.set_description(f"gradcheck {job.label if kind == 'modes' else 'autograd ' + job}")
            if kind == "modes":
                these = variants + (compiled if job.with_compiled else [])
                checks += _guarded("modes", job.label, ", ".join(these),
                                   lambda job=job, these=these: compare_modes(
                                       job, these, cfg.steps, cfg.batch_size, cfg.img_size, device, cfg.seed))
            else:
                checks += _guarded("gradcheck", "float64", job, lambda job=job: autograd_gradcheck(job, device,
                                                                                                    cfg.seed))
            if bar is not None:
                bar.update()
    finally:
        if bar is not None:
            bar.close()
    return checks


_RAN = "ran without error"


def _guarded(group: str, case: str, subject: str, run: Any) -> list[Check]:
    """Run a check function; an exception becomes one failed check instead of ending the whole run."""
    try:
        return run()
    except Exception as error:
        first = str(error).strip().splitlines()
        return [Check(group, case, subject, _RAN, False,
                      detail=f"{type(error).__name__}: {first[0] if first else ''}")]


# --- DDP ---

def _ddp(model: nn.Module, device: torch.device, sync_bn: bool) -> nn.Module:
    """``model`` under DistributedDataParallel, its BatchNorms converted to ``nn.SyncBatchNorm`` with ``sync_bn``.

    DDP refuses SyncBatchNorm modules on CPU when it wraps them, because torch's own SyncBatchNorm needs a GPU;
    effidense's does not, so on CPU the norms are converted after wrapping (in place: DDP keeps the same parameters
    and buffers).
    """
    from torch.nn.parallel import DistributedDataParallel

    if sync_bn and device.type != "cpu":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if sync_bn and device.type == "cpu":
        nn.SyncBatchNorm.convert_sync_batchnorm(ddp.module)
    return ddp


def ddp_checks(spec: ModelSpec, device: torch.device, batch_per_rank: int, img_size: int,
               seed: int = 0, sync_bn: bool = False) -> list[Check]:
    """Checks of DistributedDataParallel training; call on every rank of an initialised process group.

    With ``sync_bn`` the DDP models' norms are ``nn.SyncBatchNorm``. Returns this rank's checks;
    :func:`_merge_rank_checks` combines them over ranks.
    """
    dist = torch.distributed
    rank, world = dist.get_rank(), dist.get_world_size()
    _set_deterministic(device)
    x_full, y_full = _batch(spec, batch_per_rank * world, img_size, torch.float32, device, seed + 1)
    shards = list(zip(x_full.split(batch_per_rank), y_full.split(batch_per_rank), strict=True))
    x, y = shards[rank]
    torch.manual_seed(seed)
    base = spec.build("plain")
    _perturb_running_stats(base, seed)
    state = copy.deepcopy(base.state_dict())
    tol = tolerance(torch.float32, device.type)
    # The full batch at once sums gradient contributions in another order than shards + all-reduce.
    tol_full = max(tol, 1e-5)
    checks: list[Check] = []
    plain_grads: dict[str, dict[str, Tensor | None]] = {}
    label = f"{spec.name} / DDP {world} ranks ({backend_for(device.type)}){', SyncBatchNorm' if sync_bn else ''}, fp32"

    def build(mode: str, eval_mode: bool = False) -> nn.Module:
        model = spec.build(mode)
        model.load_state_dict(state)
        return model.to(device).train(not eval_mode)

    def loss_of(model: nn.Module, xs: Tensor, ys: Tensor) -> Tensor:
        return F.cross_entropy(model(xs), ys)

    for mode in MEMORY_MODES:
        subject = f"{mode}"
        # Single-process references.
        if sync_bn:
            # Statistics over every rank's shard: the full batch at once in train mode. Each rank's loss is its
            # shard's mean, so DDP's average of the ranks' gradients is the full-batch mean's gradient.
            single = build(mode)
            loss_of(single, x_full, y_full).backward()
            train_grads, train_stats, train_counts = _grads(single), _buffers(single, False), _buffers(single, True)
            reference, train_tol = "single process on the full batch", tol_full
        else:
            train_grads, train_stats, train_counts = {}, {}, {}
            for r, (xs, ys) in enumerate(shards):
                single = build(mode)
                (loss_of(single, xs, ys) / world).backward()
                for name, grad in _grads(single).items():
                    if grad is not None:
                        train_grads[name] = grad if train_grads.get(name) is None else train_grads[name] + grad
                    else:
                        train_grads.setdefault(name, None)
                if r == rank:
                    train_stats, train_counts = _buffers(single, False), _buffers(single, True)
            reference, train_tol = "single process, sum over rank shards", tol
        full = build(mode, eval_mode=True)
        loss_of(full, x_full, y_full).backward()
        full_grads = _grads(full)

        # DDP, train mode.
        ddp = _ddp(build(mode), device, sync_bn)
        loss_of(ddp, x, y).backward()
        grads = _grads(ddp)
        checks.append(_compare("ddp", label, subject, f"train: gradients == {reference}", grads, train_grads,
                               train_tol))
        stats_reference = "single process on the full batch" if sync_bn else "single process on own shard"
        checks.append(_compare("ddp", label, subject, f"train: BN running stats == {stats_reference}",
                               _buffers(ddp, False), train_stats, train_tol))
        checks.append(_compare("ddp", label, subject, "train: num_batches_tracked (exact)",
                               _buffers(ddp, True), train_counts, 0.0))
        checks.append(_agree(label, subject, "train: gradients identical on all ranks", grads))
        optimizer = torch.optim.SGD(ddp.parameters(), **SGD)
        optimizer.step()
        checks.append(_agree(label, subject, "parameters identical on all ranks after an SGD step", _params(ddp)))
        if mode == "plain":
            plain_grads["train"] = grads
        else:
            checks.append(_compare("ddp", label, subject, "train: gradients == plain under DDP", grads,
                                   plain_grads["train"], tol))

        # DDP, eval mode (running statistics): per-rank means average to the full-batch mean exactly.
        ddp_eval = _ddp(build(mode, eval_mode=True), device, sync_bn)
        loss_of(ddp_eval, x, y).backward()
        eval_grads = _grads(ddp_eval)
        checks.append(_compare("ddp", label, subject, "eval: gradients == single process on the full batch",
                               eval_grads, full_grads, tol_full))
        checks.append(_agree(label, subject, "eval: gradients identical on all ranks", eval_grads))
        if mode == "plain":
            plain_grads["eval"] = eval_grads
        else:
            checks.append(_compare("ddp", label, subject, "eval: gradients == plain under DDP", eval_grads,
                                   plain_grads["eval"], tol))
    return checks


def _agree(case: str, subject: str, what: str, tensors: dict[str, Tensor | None]) -> Check:
    """Every rank holds bitwise the same tensors as rank 0."""
    mine = {k: None if v is None else v.cpu() for k, v in tensors.items()}
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, mine)
    checks = [_compare("ddp", case, subject, what, other, gathered[0], 0.0) for other in gathered[1:]]
    worst = max(checks, key=lambda c: (not c.passed, c.max_abs or 0.0), default=None)
    if worst is None:
        return Check("ddp", case, subject, what, True, 0.0, 0.0, 0.0, "one rank")
    return replace(worst, detail=worst.detail.replace("bitwise equal", f"bitwise equal on {len(gathered)} ranks"))


def _merge_rank_checks(per_rank: list[list[Check]]) -> list[Check]:
    """One check per comparison: passed on every rank, the worst rank's differences."""
    merged = []
    for same in zip(*per_rank, strict=True):
        worst_rank, worst = max(enumerate(same), key=lambda rc: (not rc[1].passed, rc[1].max_rel or 0.0))
        exact = all(c.max_abs == 0 and c.passed for c in same)
        detail = worst.detail if len(same) == 1 or exact else f"{worst.detail} (worst: rank {worst_rank})"
        merged.append(replace(worst, passed=all(c.passed for c in same), detail=detail))
    return merged


def _ddp_rank(spec: ModelSpec, device_kind: str, local_rank: int, batch_per_rank: int, img_size: int,
              seed: int, sync_bn: bool = False) -> list[Check]:
    """This rank's DDP checks, merged over ranks (returned on every rank)."""
    if device_kind == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    try:
        mine = ddp_checks(spec, device, batch_per_rank, img_size, seed, sync_bn)
    except Exception as error:
        first = str(error).strip().splitlines()
        mine = [Check("ddp", f"{spec.name} / DDP", "all modes", _RAN, False,
                      detail=f"rank {torch.distributed.get_rank()}: {type(error).__name__}: "
                             f"{first[0] if first else ''}")]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, mine)
    if len({len(g) for g in gathered}) != 1:  # some rank failed early: report every rank's failures
        return [c for g in gathered for c in g if not c.passed] or [c for g in gathered for c in g]
    return _merge_rank_checks(gathered)


def _ddp_worker(rank: int, world: int, device_kind: str, spec: ModelSpec, batch_per_rank: int, img_size: int,
                seed: int, init_method: str, result_path: str, sync_bn: bool = False) -> None:
    if device_kind == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    with process_group(backend_for(device_kind), rank, world, init_method):
        checks = _ddp_rank(spec, device_kind, rank, batch_per_rank, img_size, seed, sync_bn)
    if rank == 0:
        atomic_write_bytes(result_path, json.dumps([asdict(c) for c in checks]).encode())


def run_ddp(spec: ModelSpec, device: str, nproc: int, batch_per_rank: int, img_size: int, seed: int = 0,
            torchrun: tuple[int, int, int] | None = None, sync_bn: bool = False) -> list[Check] | None:
    """DDP checks in ``nproc`` spawned processes, or as one rank of a torchrun launch (``torchrun`` =
    (rank, local_rank, world)), with ``nn.SyncBatchNorm`` norms if ``sync_bn``. Returns the merged checks, or None
    on torchrun ranks other than 0."""
    if torchrun is not None:
        rank, local_rank, world = torchrun
        check_world(device, world)
        with process_group(backend_for(device), rank, world, "env://"):
            checks = _ddp_rank(spec, device, local_rank, batch_per_rank, img_size, seed, sync_bn)
        return checks if rank == 0 else None
    check_world(device, nproc)
    if nproc < 2:
        raise ValueError(f"DDP checks need at least 2 processes, got {nproc}")
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="effidense-gradcheck-") as tmp:
        path = os.path.join(tmp, "checks.json")
        mp.spawn(_ddp_worker, nprocs=nproc, join=True,
                 args=(nproc, device, spec, batch_per_rank, img_size, seed, f"tcp://127.0.0.1:{free_port()}", path,
                       sync_bn))
        with open(path) as f:
            return [Check(**c) for c in json.load(f)]


# --- report ---

def _num(value: float | None) -> str:
    if value is None:
        return "-"
    if value == 0:
        return "0"
    if math.isinf(value):
        return "inf"
    return f"{value:.2e}"


def _cell(check: Check | None) -> str:
    if check is None:
        return ""
    if check.max_rel is None:
        return "ok" if check.passed else "FAIL"
    if check.passed and check.max_abs == 0:
        return "="
    text = "DIFF" if math.isinf(check.max_rel) else f"{check.max_rel:.1e}"
    return text if check.passed else text + "!"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*header).rstrip(), fmt.format(*("-" * w for w in widths))] + \
        [fmt.format(*r).rstrip() for r in rows]


def format_report(checks: Iterable[Check], header: Sequence[str] = (), verbose: bool = False) -> str:
    """Readable report: the mode comparisons as a table (one row per case and variant, one column per check),
    the gradcheck and DDP checks one line each, every failure spelled out, then the verdict."""
    checks = list(checks)
    lines = list(header) + ([""] if header else [])
    in_table = [c.group == "modes" and c.what != _RAN for c in checks]
    modes = [c for c, t in zip(checks, in_table, strict=True) if t]
    others = [c for c, t in zip(checks, in_table, strict=True) if not t or verbose]
    if modes:
        columns = list(dict.fromkeys(c.what for c in modes))
        rows: dict[tuple[str, str], dict[str, Check]] = {}
        for c in modes:
            rows.setdefault((c.case, c.subject), {})[c.what] = c
        table = []
        for (case, subject), found in rows.items():
            tols = sorted({c.tol for c in found.values() if c.tol})
            verdict = "PASS" if all(c.passed for c in found.values()) else "FAIL"
            table.append([case, subject, "/".join(f"{t:.0e}" for t in tols) or "-",
                          *(_cell(found.get(col)) for col in columns), verdict])
        lines += ["Memory modes against plain, trained side by side from the same weights and non-default BN "
                  "running stats:"]
        lines += _table(["case", "variant", "tol", *columns, "result"], table)
        lines += ["  = bitwise identical; a number is the relative difference: max|variant - plain| over the check's",
                  "  tensors / max|plain| over them, worst step; ! marks a failure; tol applies to all but BN count,",
                  "  which must be identical. Columns:"]
        lines += [f"    {k:<12} {v}" for k, v in MODE_CHECK_DESCRIPTIONS.items() if k in columns]
        lines.append("")
    if others:
        lines.append("abs: largest absolute difference; rel: that over the largest reference magnitude; tol: the "
                     "largest rel allowed (0: identical).")
        width = max(len(c.what) for c in others)
        section = None
        for c in others:
            if (c.group, c.case, c.subject) != section:
                section = (c.group, c.case, c.subject)
                lines.append(f"[{c.group}] {c.case}: {c.subject}")
            lines.append(f"  {'PASS' if c.passed else 'FAIL'}  {c.what.ljust(width)}  abs {_num(c.max_abs):>8}  "
                         f"rel {_num(c.max_rel):>8}  tol {_num(c.tol):>8}  {c.detail}")
        lines.append("")
    failed = [c for c in checks if not c.passed]
    if not checks:
        lines.append("FAIL: nothing was checked")
    elif failed:
        lines.append(f"FAIL: {len(failed)} of {len(checks)} checks failed:")
        lines += [f"  {c.case}: {c.subject}: {c.what}: rel {_num(c.max_rel)} > tol {_num(c.tol)} ({c.detail})"
                  if c.max_rel is not None else f"  {c.case}: {c.subject}: {c.what}: {c.detail}" for c in failed]
    else:
        lines.append(f"PASS: all {len(checks)} checks passed")
    return "\n".join(lines)


def checks_to_json(checks: Iterable[Check], environment: dict[str, Any]) -> dict[str, Any]:
    """Every check plus the environment, JSON-serialisable (infinities as strings)."""
    def clean(value: Any) -> Any:
        return str(value) if isinstance(value, float) and not math.isfinite(value) else value

    items = [{k: clean(v) for k, v in asdict(c).items()} for c in checks]
    return {"schema": "effidense.gradcheck/1", "environment": environment, "passed": all(c["passed"] for c in items)
            and bool(items), "checks": items}
