"""Section ``prediction``: the planner's predicted peak against ``torch.cuda.max_memory_allocated``, per mode at two
batch sizes, and the predicted largest batch against the max-batch section's measured one.

On a GPU the measured step is the planner's own (zero_grad, forward under bf16 autocast, cross-entropy, backward; no
optimizer update), run on real CUDA tensors with the model and batch resident, so both sides count the same things
apart from what only the device adds (cuDNN/cuBLAS workspaces and the allocator's rounding). In smoke runs the
"measured" side is the same step on real CPU tensors under the planner's storage tracker.
"""
from __future__ import annotations

from typing import Any

import torch

from ..benchmark import ratio
from ..failures import short_error
from ..harness import StepProbe, StepSpec, release, training_step
from ..planner import plan
from .plan import EAGER, VARIANTS
from .state import Run
from .steps import build_model

GOAL_PEAK_REL = 0.10  # predicted peak within 10% of the measured one


def _measured_peak(run: Run, name: str, batch: int, img: int) -> int:
    """Peak bytes of one real step (model, batch and gradients included)."""
    spec = run.plan.dn121
    step = StepSpec(in_chans=spec.arg("in_chans"), num_classes=spec.arg("num_classes"), amp=torch.bfloat16,
                    optimizer="none")
    if run.device.type != "cuda":
        return StepProbe(lambda: build_model(name, spec, {}), step, fake=False).measure(batch, (img, img)).peak_bytes
    release(run.device)
    model = build_model(name, spec, {}).to(run.device).train()
    x = torch.randn(batch, spec.arg("in_chans"), img, img, device=run.device)
    y = torch.randint(0, spec.arg("num_classes"), (batch,), device=run.device)
    try:
        torch.cuda.synchronize(run.device)
        torch.cuda.reset_peak_memory_stats(run.device)
        training_step(model, x, y, "bf16")
        torch.cuda.synchronize(run.device)
        return torch.cuda.max_memory_allocated(run.device)
    finally:
        del model, x, y
        release(run.device)


def section_prediction(run: Run, section: dict[str, Any]) -> None:
    data = section["data"]
    plan_cfg = run.plan
    batches = sorted({cell.batch for cell in plan_cfg.cells})[:2]
    rows = data.setdefault("rows", [])
    measured_max = {e["variant"]: e.get("value") for e in
                    run.report["sections"].get("max-batch", {}).get("data", {}).get("searches", [])
                    if e.get("cap") == plan_cfg.cap.label}
    cap_bytes = plan_cfg.cap.bytes if run.device.type == "cuda" else None
    data["setting"] = (f"{plan_cfg.dn121.name}, {plan_cfg.img_size} px, bf16 autocast, no optimizer update; "
                       f"largest batch under {plan_cfg.cap.label} (no safety margin)")
    for name in EAGER:  # bench's names, which the planner takes too
        run.check_time()
        run.log(f"[prediction] {name}")
        row: dict[str, Any] = {"variant": name, "label": VARIANTS[name], "points": []}
        rows.append(row)
        try:
            predicted = plan(plan_cfg.dn121, variants=name, img_size=plan_cfg.img_size,
                             batch_size=batches[0], amp="bf16", optimizer="none", budget=cap_bytes,
                             margin=0.0).variants[0]
            if not predicted.ok:
                raise RuntimeError(predicted.error)
            for batch in batches:
                guess = round(predicted.intercept_bytes + predicted.bytes_per_sample * batch)
                real = _measured_peak(run, name, batch, plan_cfg.img_size)
                row["points"].append({"batch": batch, "predicted_bytes": guess, "measured_bytes": real,
                                      "rel_error": (guess - real) / real})
            row["predicted_max_batch"] = predicted.max_batch
            row["measured_max_batch"] = measured_max.get(name)
            row["max_batch_ratio"] = ratio(predicted.max_batch, measured_max.get(name))
            row["status"] = "ok"
        except Exception as error:  # recorded; the other variants still run
            row["status"], row["error"] = "failed", short_error(error, kind=True)
        run.save()


def goals_prediction(run: Run, section: dict[str, Any]) -> None:
    """Predicted peak within 10% of the measured one, for every mode and batch."""
    errors = [abs(p["rel_error"]) for row in section.get("data", {}).get("rows", []) for p in row.get("points", [])]
    worst = max(errors) if errors else None
    section["goals"].append({"goal": f"predicted peak within {GOAL_PEAK_REL:.0%} of the measured, every mode and "
                                     "batch", "passed": None if worst is None else worst <= GOAL_PEAK_REL,
                             "detail": "-" if worst is None else f"worst {worst:.1%}"})
