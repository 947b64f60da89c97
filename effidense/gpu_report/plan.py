"""Settings of a GPU evidence run: sections, variants, goals, the published figures, and the plans."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ..harness import PEERS
from ..memory import MiB
from ..modelspec import ModelSpec, resolve_model

GiB = 1 << 30
SCHEMA = "effidense.gpu_report/1"
REPORT_JSON, SUMMARY_MD = "report.json", "summary.md"

# Section name: (title, share of the time budget). Shares are of what is left when the section starts, so time one
# section leaves unused goes to the later ones.
SECTIONS: dict[str, tuple[str, float]] = {
    "step-time": ("DenseNet-121 step time, images/s and peak memory", 0.40),
    "max-batch": ("Largest batch, DenseNet-121 224 px bf16", 0.20),
    "seed": ("The seed's setting: DenseNet-BC (12,12,12), k=12, 32 px, batch 128, fp32", 0.07),
    "depth": ("Deepest DenseNet-BC (k=12, 32 px, batch 64) under the memory cap", 0.14),
    "host-bound": ("Host-bound check: GPU idle fraction of a step", 0.06),
    "prediction": ("The planner's predicted peak and largest batch against the measured ones", 0.06),
    "3d": ("3D DenseNet-121 on volumes (1 channel, bf16) against MONAI's DenseNet121", 0.10),
    "correctness": ("Correctness on the device: gradcheck and pytest -m cuda", 0.13),
}

VARIANTS: dict[str, str] = {
    **{peer: PEERS[peer] for peer in ("tv-plain", "tv", "timm")},  # bench's peers, bench's names
    "plain": "effidense plain",
    "efficient": "effidense efficient",
    "frugal": "effidense frugal",
    "monai": PEERS["monai"],
    "efficient+torch.compile": "effidense efficient, whole-model torch.compile",
}
EAGER = ("tv-plain", "tv", "timm", "plain", "efficient", "frugal")
COMPILED = ("efficient+torch.compile",)

# The seed project's published 1080 Ti table (DenseNet-BC (12,12,12), k=12, 32 px, batch 128, fp32), in ms.
SEED_TIMES = {"plain": (38.0, 77.9), "efficient": (38.0, 103.5)}
SEED_MAX_BATCH = {"plain": 350, "efficient": 1450}
PAPER_DEPTH = {"plain": 160, "efficient": 480}  # ~layers that train on 12 GB (Pleiss et al.)

GOAL_STEP_RATIO, GOAL_MEMORY_X = 1.10, 4.0
GOAL_BATCH_X = {"efficient": 6.0, "frugal": 15.0}
GOAL_FRUGAL_DEPTH = 2000
GOAL_VOLUME_MEMORY_X = 4.5  # efficient keeps at least this much less than MONAI's DenseNet121 on volumes
class OutOfTime(Exception):
    """The current section's share of the time budget is spent."""


@dataclass(frozen=True)
class Cell:
    """One setting of the step-time matrix."""

    batch: int
    amp: str | None
    channels_last: bool
    variants: tuple[str, ...]

    @property
    def label(self) -> str:
        return f"batch {self.batch}, {self.amp or 'fp32'}{', channels_last' if self.channels_last else ''}"


@dataclass(frozen=True)
class Cap:
    """A memory limit: real (a fraction of the GPU, None = the whole GPU) or, in smoke runs, a meter byte budget."""

    label: str
    bytes: int | None


@dataclass(frozen=True)
class Plan:
    """Everything a run measures: the GPU plan or its tiny CPU stand-in."""

    smoke: bool
    device: str
    dn121: ModelSpec
    img_size: int
    cells: tuple[Cell, ...]
    warmup: int
    steps: int
    compile_options: dict[str, Any]
    caps: tuple[Cap, ...]
    batch_unit: int  # max-batch searches run over multiples of this (fewer probes of huge batches)
    batch_start: int
    batch_limit: int
    seed_spec: ModelSpec
    seed_img: int
    seed_batch: int
    depth_growth: int
    depth_img: int
    depth_batch: int
    depth_start: int
    depth_limit: int
    profile_steps: int
    gradcheck_args: tuple[str, ...]
    time_budget_s: float
    threads: int | None = None  # torch CPU threads (tiny models run fastest on one; None: leave as is)
    seed_cap: Cap | None = None  # the seed section's cap when not ``cap`` (smoke: its model needs a larger budget)

    @property
    def cap(self) -> Cap:
        """The 12 GiB cap (or its smoke stand-in), used by the seed and depth sections."""
        return self.caps[0]


def _cells(batches: Sequence[int]) -> tuple[Cell, ...]:
    """The step-time matrix, most important first: batch 64 before 256, bf16 before fp32, channels_last first.

    The compiled path joins the first cell, and a last fp32 cell of its own (with torchvision plain to compare).
    """
    small, large = batches
    cells = []
    for batch in (small, large):
        for amp in ("bf16", None):
            for channels_last in (True, False):
                extra = COMPILED if not cells else ()
                cells.append(Cell(batch, amp, channels_last, EAGER + extra))
    cells.append(Cell(small, None, True, ("tv-plain", "efficient") + COMPILED))
    return tuple(cells)


def _bc_spec(blocks: Sequence[int], growth: int, name: str) -> ModelSpec:
    return ModelSpec(name, dict(growth_rate=growth, block_config=tuple(blocks), num_init_features=2 * growth,
                                small_inputs=True, num_classes=10))


def gpu_plan(time_budget_s: float = 510.0) -> Plan:
    """The matrix of issue 13 on one CUDA GPU, budgeted to finish in under 9 minutes on an H100."""
    return Plan(
        smoke=False, device="cuda", dn121=resolve_model("densenet121"), img_size=224, cells=_cells((64, 256)),
        warmup=2, steps=5, compile_options={}, caps=(Cap("12 GiB", 12 * GiB), Cap("whole GPU", None)),
        batch_unit=8, batch_start=64, batch_limit=1 << 16,
        seed_spec=_bc_spec((12, 12, 12), 12, "DenseNet-BC (12,12,12) k=12"), seed_img=32, seed_batch=128,
        depth_growth=12, depth_img=32, depth_batch=64, depth_start=16, depth_limit=2048,
        profile_steps=5, gradcheck_args=("--device", "cuda", "--quiet"), time_budget_s=time_budget_s)


def smoke_plan(time_budget_s: float = 115.0) -> Plan:
    """The same run on the CPU with tiny models; caps are byte budgets on the deterministic meter."""
    tiny = ModelSpec("tiny DenseNet-BC (stands in for DenseNet-121)",
                     dict(growth_rate=4, block_config=(2, 2), num_init_features=8, num_classes=10))
    return Plan(
        smoke=True, device="cpu", dn121=tiny, img_size=16, cells=_cells((4, 8)), warmup=1, steps=2,
        compile_options={"backend": "aot_eager"},
        caps=(Cap("64 KiB of saved activations (meter; stands in for 12 GiB)", MiB // 16),
              Cap("256 KiB of saved activations (meter; stands in for the whole GPU)", MiB // 4)),
        batch_unit=1, batch_start=4, batch_limit=1024,
        seed_spec=_bc_spec((2, 2, 2), 4, "tiny DenseNet-BC (2,2,2) k=4 (stands in for (12,12,12) k=12)"),
        seed_img=16, seed_batch=16,
        depth_growth=4, depth_img=8, depth_batch=2, depth_start=2, depth_limit=256,
        profile_steps=2, gradcheck_args=("--device", "cpu", "--quiet"), time_budget_s=time_budget_s, threads=1,
        seed_cap=Cap("1 MiB of saved activations (meter; stands in for 12 GiB)", MiB))




VOLUME_VARIANTS = ("monai", "plain", "efficient", "frugal")


def volume_spec(plan: Plan) -> ModelSpec:
    """DenseNet-121 (or the smoke run's stand-in) for volumes, as MONAI's 3D classifier: 1 channel, 2 classes."""
    return ModelSpec(f"{plan.dn121.name}, 3D", {**plan.dn121.kwargs, "spatial_dims": 3, "in_chans": 1,
                                                  "num_classes": 2})


def volume_settings(plan: Plan) -> tuple[tuple[int, Cell], ...]:
    """(cube edge, cell): MONAI's tutorial volume at batch 2, and a larger one at batch 1."""
    amp = None if plan.smoke else "bf16"
    sizes = ((16, 2), (20, 1)) if plan.smoke else ((96, 2), (128, 1))
    return tuple((edge, Cell(batch, amp, False, VOLUME_VARIANTS)) for edge, batch in sizes)


def depth_spec(plan: Plan, layers_per_block: int) -> ModelSpec:
    return _bc_spec((layers_per_block,) * 3, plan.depth_growth, f"DenseNet-BC k={plan.depth_growth}")



def plan_to_json(plan: Plan) -> dict[str, Any]:
    data = asdict(plan)
    for key in ("dn121", "seed_spec"):
        spec: ModelSpec = getattr(plan, key)
        data[key] = {"name": spec.name, "depth": spec.depth,
                     "kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in spec.kwargs.items()}}
    return data
