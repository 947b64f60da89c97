"""Single-process checks: every mode trained side by side with plain (:func:`compare_modes`), and
``torch.autograd.gradcheck`` in float64 (:func:`autograd_gradcheck`)."""
from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from ..densenet import MEMORY_MODES
from ..failures import is_oom, short_error
from ..harness import COMPILE_SUFFIX, compile_model, training_step
from ..harness.segmentation import SegmentationSpec
from ..modelspec import ModelSpec
from ..progress import Progress
from .core import (
    CHANNELS_LAST,
    FINAL_CHECKS,
    GRADCHECK_MODEL,
    GRADCHECK_PARAMETERS,
    GRADCHECK_SEGMENTATION,
    GRADCHECK_TOLERANCES,
    RAN,
    SGD,
    TRAIN_CHECKS,
    Case,
    Check,
    VerifyConfig,
    batch_norms_of,
    buffers_of,
    compare_tensors,
    grads_of,
    input_batch,
    params_of,
    perturb_running_stats,
    set_deterministic,
    tolerance,
)

__all__ = ["default_cases", "compare_modes", "autograd_gradcheck", "run_local_checks"]


def default_cases(specs: Sequence[ModelSpec | SegmentationSpec], amp: str = "bf16") -> list[Case]:
    """The first spec under every setting, the others under the basic ones."""
    cases: list[Case] = []
    for i, spec in enumerate(specs):
        # Compiled copies (the whole model) join the fp32 case alone: each case compiles them afresh, and inductor
        # draws dropout's random numbers its own way, so no compiled model matches plain under dropout.
        cases += [Case("fp32", spec, with_compiled=i == 0),
                  Case("dropout 0.2", spec, drop_rate=0.2),
                  Case("BN momentum=None", spec, cumulative_bn=True)]
        if i == 0:
            dims = spec.arg("spatial_dims")
            if dims in CHANNELS_LAST:  # a signal has no channels-last layout
                cases.append(Case("channels_last" if dims == 2 else "channels_last_3d", spec, channels_last=True))
            cases += [Case("fp64", spec, dtype=torch.float64),
                      Case(f"autocast {amp}", spec, amp=amp)]
    return cases


def compare_modes(case: Case, variants: Sequence[str], steps: int, batch_size: int, img_size: int,
                  device: str | torch.device = "cpu", seed: int = 0) -> list[Check]:
    """Train plain and every variant side by side for ``steps`` SGD steps; compare everything with plain's."""
    device = torch.device(device)
    set_deterministic(device)

    def build(variant: str) -> nn.Module:
        mode = variant.removesuffix(COMPILE_SUFFIX)
        model = case.spec.build(mode, drop_rate=case.drop_rate)
        if case.cumulative_bn:
            for bn in batch_norms_of(model):
                bn.momentum = None
        model.load_state_dict(state)
        model.to(device=device, dtype=case.dtype)
        if case.channels_last:
            model.to(memory_format=CHANNELS_LAST[case.spec.arg("spatial_dims")])
        return compile_model(model) if variant.endswith(COMPILE_SUFFIX) else model

    torch.manual_seed(seed)
    reference = case.spec.build("plain", drop_rate=case.drop_rate)
    perturb_running_stats(reference, seed)
    state = copy.deepcopy(reference.state_dict())
    names = ["plain", *[v for v in variants if v != "plain"]]
    models = {v: build(v) for v in names}
    optimizers = {v: torch.optim.SGD(m.parameters(), **SGD) for v, m in models.items()}
    checks: list[Check] = []

    def record(v: str, x: Tensor, y: Tensor, step_seed: int) -> dict[str, Any]:
        model = models[v]
        torch.manual_seed(step_seed)  # the same dropout masks in every variant
        step = training_step(model, x, y, case.amp, optimizer=optimizers[v], keep=True)
        return {"output": {"output": step.output.clone()}, "loss": {"loss": step.loss.clone()},
                "grads": grads_of(model), "stats": buffers_of(model, integer=False),
                "counts": buffers_of(model, integer=True)}

    per_step: dict[str, dict[str, list[Check]]] = {v: {k: [] for k in TRAIN_CHECKS} for v in names[1:]}
    for step in range(steps):
        x, y = input_batch(case.spec, batch_size, img_size, case.dtype, device, seed + 1 + step, case.channels_last)
        results = {}
        for v, model in models.items():
            model.train()
            results[v] = record(v, x, y, seed + 1000 + step)
        for v in names[1:]:
            tol = tolerance(case.dtype, device.type, case.amp, v.endswith(COMPILE_SUFFIX))
            for key, label in TRAIN_CHECKS.items():
                check = compare_tensors("modes", case.label, v, label, results[v][key], results["plain"][key],
                                 0.0 if key == "counts" else tol)
                per_step[v][key].append(replace(check, detail=f"step {step + 1}: {check.detail}"))
    for v in names[1:]:
        checks += [_worst(found) for found in per_step[v].values()]

    x, y = input_batch(case.spec, batch_size, img_size, case.dtype, device, seed + 999, case.channels_last)
    x.requires_grad_(True)
    final = {}
    for v, model in models.items():
        params = params_of(model)
        x.grad = None
        out = training_step(model.eval(), x, y, case.amp, keep=True).output
        final[v] = {"params": params, "eval output": {"output": out.clone()},
                    "eval grads": {**grads_of(model), "input": x.grad.detach().clone()},
                    "eval buffers": buffers_of(model, integer=False) | buffers_of(model, integer=True)}
    for v in names[1:]:
        tol = tolerance(case.dtype, device.type, case.amp, v.endswith(COMPILE_SUFFIX))
        for key, label in FINAL_CHECKS.items():
            checks.append(compare_tensors("modes", case.label, v, label, final[v][key], final["plain"][key], tol))
    return checks


def _worst(checks: Sequence[Check]) -> Check:
    """One check for a comparison repeated over steps: failed if any failed, the worst step's numbers."""
    worst = max(checks, key=lambda c: (not c.passed, c.max_rel or 0.0, c.max_abs or 0.0))
    if all(c.max_abs == 0 and c.passed for c in checks):
        worst = replace(worst, detail=f"{len(checks)} step{'s' if len(checks) > 1 else ''}: "
                                      f"{worst.detail.split(': ', 1)[-1]}")
    return replace(worst, passed=all(c.passed for c in checks))


# gradcheck's input edge per spatial dims: every element is perturbed twice, so a volume's is kept small.
GRADCHECK_EDGE = {1: 6, 2: 6, 3: 4}


def autograd_gradcheck(memory: str, device: str | torch.device = "cpu", seed: int = 0,
                       spatial_dims: int = 2, segmentation: bool = False) -> list[Check]:
    """``torch.autograd.gradcheck`` in float64 (train mode, input and two parameters inside recomputed segments),
    and a random-direction check that reports how far the analytical derivative is from central differences, on
    the tiny model in ``spatial_dims`` (signals, images or volumes): a DenseNet, or with ``segmentation`` an
    FC-DenseNet."""
    device = torch.device(device)
    set_deterministic(device)
    torch.manual_seed(seed)
    base = GRADCHECK_SEGMENTATION if segmentation else GRADCHECK_MODEL
    spec = base if spatial_dims == 2 else type(base)(
        f"{base.name} {spatial_dims}D", {**base.kwargs, "spatial_dims": spatial_dims})
    model = spec.build(memory).to(device=device, dtype=torch.float64).train()
    generator = torch.Generator().manual_seed(seed)
    edge = GRADCHECK_EDGE[spatial_dims]
    x = torch.randn(2, 3, *(edge,) * spatial_dims, generator=generator, dtype=torch.float64)
    x = x.to(device).requires_grad_(True)
    # gradcheck perturbs its inputs in place, so passing the parameters themselves checks their gradients.
    inputs = (x, *(model.get_parameter(name) for name in GRADCHECK_PARAMETERS[base.name]))

    def fn(x: Tensor, *params: Tensor) -> Tensor:
        return model(x)

    label = f"{spec.name} / float64, train mode"
    what = "torch.autograd.gradcheck (input, conv1 and norm1 weights)" if not segmentation else \
        "torch.autograd.gradcheck (input, a conv1 and a norm weight)"
    subject = f"{memory}"
    tols = GRADCHECK_TOLERANCES
    try:
        # GPU backward kernels may add with atomics (different rounding per call); the CPU must be deterministic.
        torch.autograd.gradcheck(fn, inputs, eps=tols["eps"], atol=tols["atol"], rtol=tols["rtol"],
                                 nondet_tol=0.0 if device.type == "cpu" else 1e-10)
        verdict = Check("gradcheck", label, subject, what,
                        True, tol=tols["rtol"], detail=f"eps {tols['eps']:g}, atol {tols['atol']:g}, "
                                                       f"rtol {tols['rtol']:g}")
    except Exception as error:  # gradcheck raises GradcheckError; anything else is a failure just the same
        verdict = Check("gradcheck", label, subject, what,
                        False, tol=tols["rtol"], detail=short_error(error, kind=True))

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
        rel = diff / max(abs(numerical), 1e-12)
        if not (math.isfinite(diff) and math.isfinite(rel)):  # max() would drop a NaN, and the check pass
            diff = rel = math.inf
        worst_abs = max(worst_abs, diff)
        worst_rel = max(worst_rel, rel)
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
    if cfg.gradcheck:  # in the checked models' spatial dims: a 3D run checks 3D gradients
        kinds = sorted({(s.arg("spatial_dims"), isinstance(s, SegmentationSpec)) for s in cfg.specs})
        jobs += [("gradcheck", (m, d, seg)) for d, seg in kinds for m in MEMORY_MODES]
    bar = Progress(len(jobs), "gradcheck", "checks", enabled=progress)
    checks: list[Check] = []
    try:
        for kind, job in jobs:
            bar.describe(f"gradcheck {job.label if kind == 'modes' else 'autograd ' + job[0]}")
            if kind == "modes":
                these = variants + (compiled if job.with_compiled else [])
                checks += _guarded("modes", job.label, ", ".join(these),
                                   lambda job=job, these=these: compare_modes(
                                       job, these, cfg.steps, cfg.batch_size, cfg.img_size, device, cfg.seed))
            else:
                mode, dims, seg = job
                checks += _guarded("gradcheck", "float64", mode, lambda mode=mode, dims=dims, seg=seg:
                                   autograd_gradcheck(mode, device, cfg.seed, dims, segmentation=seg))
            bar.advance()
    finally:
        bar.close()
    return checks


def _guarded(group: str, case: str, subject: str, run: Any) -> list[Check]:
    """Run a check function; an exception becomes one failed check instead of ending the whole run. Running out of
    memory ends it: that says nothing about the modes, and every other check would run out too."""
    try:
        return run()
    except Exception as error:
        if is_oom(error):
            raise
        return [Check(group, case, subject, RAN, False, detail=short_error(error, kind=True))]
