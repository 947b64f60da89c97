"""Memory budgets: byte sizes (``24GiB``, ``80 GB``, ``12e9``), GPU presets, the devices and their safety margins.
Torch-free, so that ``effidense plan`` refuses a budget it cannot read before torch loads."""
from __future__ import annotations

import re

__all__ = ["GiB", "MiB", "GPU_PRESETS", "DEVICES", "DEFAULT_MARGIN", "DEFAULT_MARGINS", "parse_budget",
           "format_bytes"]

MiB = 1 << 20
GiB = 1 << 30

# A GPU's nominal memory, in GiB (binary, as torch.cuda reports it). The device reports a little less than the
# nominal size, and the CUDA context takes a few hundred MiB of it before any tensor: the safety margin covers both.
GPU_PRESETS: dict[str, int] = {
    "h200-141gb": 141 * GiB,
    "h100-80gb": 80 * GiB,
    "a100-80gb": 80 * GiB,
    "a100-40gb": 40 * GiB,
    "l40s-48gb": 48 * GiB,
    "a6000-48gb": 48 * GiB,
    "rtx4090-24gb": 24 * GiB,
    "rtx3090-24gb": 24 * GiB,
    "a10-24gb": 24 * GiB,
    "l4-24gb": 24 * GiB,
    "v100-32gb": 32 * GiB,
    "v100-16gb": 16 * GiB,
    "t4-16gb": 16 * GiB,
    **{f"{n}gb": n * GiB for n in (8, 12, 16, 24, 32, 40, 48, 80)},
}

# Fraction of the budget held back, by the device the plan is for (docs/planner.md has the measurements). On the CPU
# the plan counts kernel scratch and its largest miss below the allocator's peak over DenseNet-121's modes, peers,
# sizes and optimizers is a fraction of a percent: 1% covers it with room for shapes outside the fit. On CUDA the
# margin holds back what no prediction counts there (the CUDA context, cuDNN/cuBLAS workspaces, allocator rounding,
# NCCL buffers); no GPU has measured it yet, so it stays at 5% until `effidense plan --check` on one does.
DEFAULT_MARGINS = {"cuda": 0.05, "cpu": 0.01}
DEVICES = tuple(DEFAULT_MARGINS)  # what a planned step runs on
DEFAULT_MARGIN = DEFAULT_MARGINS["cuda"]

# Binary throughout: GPU memory is labelled in GB that are GiB (an "80GB" H100 holds 80 GiB), and a preset "24gb" must
# mean the same as a size "24GB".
_UNITS = {"": 1, "b": 1, **{f"{p}{u}": 1 << (10 * (i + 1)) for i, p in enumerate("kmgt") for u in ("", "b", "ib")}}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_budget(text: str | int | float) -> int:
    """Bytes of a budget: a number of bytes, a size with a unit (``24GiB``, ``80GB``: binary units, GB = GiB) or a
    GPU preset from :data:`GPU_PRESETS` (``h100-80gb``, ``rtx4090-24gb``, ``12gb``). Raises ValueError naming what
    it could not read."""
    if isinstance(text, bool):
        raise ValueError(f"budget must be a size such as 24GiB or a preset, got {text!r}")
    if isinstance(text, int | float):
        if text != text:  # NaN
            raise ValueError(f"budget must be a number of bytes, got {text!r}")
        if not text < 2 ** 63:
            raise ValueError(f"budget {text!r} is more bytes than a 64-bit machine addresses")
        value = int(text)
    else:
        name = text.strip().lower()
        if name in GPU_PRESETS:
            return GPU_PRESETS[name]
        match = _SIZE.match(name)
        if not match or match.group(2) not in _UNITS:
            raise ValueError(f"cannot read budget {text!r}: give a size such as 24GiB, 80GB (= GiB) or 12e9 (bytes), "
                             f"or a GPU preset: {', '.join(GPU_PRESETS)}")
        number = float(match.group(1)) * _UNITS[match.group(2)]
        if not number < 2 ** 63:  # 1e400 is inf
            raise ValueError(f"budget {text!r} is more bytes than a 64-bit machine addresses")
        value = int(number)
    if value <= 0:
        raise ValueError(f"budget must be positive, got {text!r}")
    return value


def format_bytes(n: int | None) -> str:
    """``1.23 GiB`` / ``456.7 MiB`` for tables."""
    if n is None:
        return "-"
    if abs(n) >= GiB:
        return f"{n / GiB:.2f} GiB"
    if abs(n) >= MiB:
        return f"{n / MiB:.1f} MiB"
    return f"{n / 1024:.1f} KiB"
