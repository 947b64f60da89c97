"""What a GPU evidence run measures: its sections, each a command of bench, plan --check, gradcheck and pytest, and
the GPU plan or its tiny CPU stand-in."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..choices import REPORT_SECTIONS
from ..harness import PEERS
from ..modelspec import ModelSpec, resolve_model

SCHEMA = "effidense.gpu_report/2"
REPORT_JSON, SUMMARY_MD = "report.json", "summary.md"

SECTIONS = REPORT_SECTIONS
# The variants of bench, plan and gpu-report are the harness's, with its peers' names.
EAGER = ("tv-plain", "tv", "timm", "plain", "efficient", "frugal")
VARIANTS: dict[str, str] = {**PEERS, "plain": "effidense plain", "efficient": "effidense efficient",
                            "frugal": "effidense frugal"}


class OutOfTime(Exception):
    """The current section's share of the time budget is spent."""


@dataclass(frozen=True)
class Plan:
    """Everything a run measures: the model (a config name or ``custom`` with DenseNet arguments), its step, and the
    extra flags of each command. ``commands`` maps a section to its (label, effidense command and flags) pairs;
    every bench and gradcheck command also gets the model, ``--device`` and a ``--json`` file in the run's
    directory."""

    smoke: bool
    device: str
    model: str
    model_kwargs: dict[str, Any]
    img_size: int
    batch: int
    amp: str | None
    commands: dict[str, tuple[tuple[str, tuple[str, ...]], ...]]
    time_budget_s: float
    threads: int | None = None  # torch CPU threads of every command (None: each command's default)
    volume: dict[str, Any] = field(default_factory=dict)  # DenseNet arguments the 3d section changes

    @property
    def spec(self) -> ModelSpec:
        return resolve_model(self.model, self.model_kwargs)

    def model_flags(self, section: str) -> list[str]:
        """``--model`` (and ``--model-kwargs``) of ``section``'s commands."""
        kwargs = {**self.model_kwargs, **(self.volume if section == "3d" else {})}
        return ["--model", self.model, *(["--model-kwargs", *(f"{k}={v!r}" for k, v in kwargs.items())]
                                         if kwargs else [])]


def _commands(batch: int, img: int, amp: str | None, eager_extra: tuple[str, ...], gpu: bool,
              volume: tuple[int, int]) -> dict[str, tuple[tuple[str, tuple[str, ...]], ...]]:
    step = ("--batch-size", str(batch), "--img-size", str(img), *(("--amp", amp) if amp else ()))
    edge, volume_batch = volume
    commands = {
        "step-time": (("bench", ("bench", *step, "--channels-last", "--variants", ",".join(EAGER + eager_extra))),),
        "max-batch": (("bench --max-batch", ("bench", *step, "--channels-last", "--variants",
                                            "plain,efficient,frugal,tv", "--max-batch", "--warmup", "1",
                                            "--steps", "1")),) if gpu else (),
        "prediction": (("plan --check", ("plan", "--check", str(batch), "--img-size", str(img),
                                         *(("--amp", amp) if amp else ()), "--optimizer", "none", "--variants",
                                         ",".join(EAGER))),),
        "3d": (("bench 3d", ("bench", "--batch-size", str(volume_batch), "--img-size", str(edge),
                             *(("--amp", amp) if amp else ()), "--variants", "monai,plain,efficient,frugal")),),
        "correctness": (("gradcheck", ("gradcheck", "--quiet")), ("pytest -m cuda", ("pytest", "-m", "cuda"))),
    }
    return commands


def gpu_plan(time_budget_s: float = 510.0, model: str = "densenet121", model_kwargs: dict[str, Any] | None = None,
             img_size: int = 224, batch: int = 64, edge: int = 96) -> Plan:
    """DenseNet-121 (or ``model``) at 224 px, batch 64, bf16, channels_last, on one CUDA GPU; volumes of 96^3 (or
    ``edge``) at batch 2."""
    return Plan(smoke=False, device="cuda", model=model, model_kwargs=dict(model_kwargs or {}), img_size=img_size,
                batch=batch, amp="bf16", commands=_commands(batch, img_size, "bf16", ("efficient+compile",), True,
                                                             (edge, 2)),
                time_budget_s=time_budget_s, volume={"spatial_dims": 3, "in_chans": 1, "num_classes": 2})


def smoke_plan(time_budget_s: float = 115.0) -> Plan:
    """The same run on the CPU with a tiny DenseNet-BC standing in for DenseNet-121 (no compiled variant, whose
    inductor build would take minutes on a CPU; no largest-batch search, which needs a GPU's memory)."""
    tiny = dict(growth_rate=4, block_config=(2, 2), num_init_features=8, num_classes=10)
    return Plan(smoke=True, device="cpu", model="custom", model_kwargs=tiny, img_size=16, batch=4, amp="bf16",
                commands=_commands(4, 16, "bf16", (), False, (16, 2)), time_budget_s=time_budget_s, threads=1,
                volume={"spatial_dims": 3, "in_chans": 1, "num_classes": 2})
