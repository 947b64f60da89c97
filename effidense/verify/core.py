"""What every check shares: :class:`Check`, the settings (:class:`Case`, :class:`VerifyConfig`), tolerances, the
comparison of named tensors (:func:`tensor_diff`, :func:`compare_tensors`), and reading gradients and buffers out
of a model. Its helpers are public for the checks in :mod:`.local` and :mod:`.ddp`."""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..harness.segmentation import SegmentationSpec
from ..harness.step import AMP_DTYPES, CHANNELS_LAST, make_batch
from ..modelspec import ModelSpec

__all__ = ["Check", "Case", "VerifyConfig", "TINY_BC", "TINY_SMALL_INPUTS", "GRADCHECK_MODEL", "GRADCHECK_SEGMENTATION",
           "GRADCHECK_PARAMETERS", "GRADCHECK_TOLERANCES",
           "SGD", "TRAIN_CHECKS", "FINAL_CHECKS", "MODE_CHECK_DESCRIPTIONS", "RAN", "tolerance", "tensor_diff",
           "compare_tensors", "batch_norms_of", "perturb_running_stats", "grads_of", "params_of", "buffers_of",
           "CHANNELS_LAST", "input_batch", "input_shape", "set_deterministic"]


# Tiny default models: one DenseNet-BC with the ImageNet stem, one plain DenseNet with the small-input stem.
TINY_BC = ModelSpec("tiny DenseNet-BC", dict(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2,
                                             num_classes=5))
TINY_SMALL_INPUTS = ModelSpec("tiny DenseNet, small inputs", dict(
    growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=None, compression=1.0, small_inputs=True,
    num_classes=5))
GRADCHECK_MODEL = ModelSpec("gradcheck DenseNet-BC", dict(
    growth_rate=2, block_config=(1, 1), num_init_features=4, bn_size=2, small_inputs=True, num_classes=3))
# The smallest FC-DenseNet: one pooling, one layer per block (every part: stem, down, bottleneck, up, classifier).
GRADCHECK_SEGMENTATION = SegmentationSpec("gradcheck FC-DenseNet", dict(
    spatial_dims=2, in_channels=3, out_channels=3, down_blocks=(1,), up_blocks=(1,), bottleneck_layers=1,
    growth_rate=2, init_features=4, drop_rate=0.0))
# The parameters gradcheck perturbs besides the input: a convolution and a norm inside recomputed segments.
GRADCHECK_PARAMETERS = {
    GRADCHECK_MODEL.name: ("features.denseblock2.denselayer1.conv1.weight",
                           "features.denseblock1.denselayer1.norm1.weight"),
    GRADCHECK_SEGMENTATION.name: ("up.0.denselayer1.conv1.weight", "transitions_down.0.norm.weight"),
}
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
    spec: ModelSpec | SegmentationSpec
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

    specs: list[ModelSpec | SegmentationSpec] = field(default_factory=lambda: [TINY_BC, TINY_SMALL_INPUTS])
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
        for spec in self.specs:
            problem = spec.size_problem(self.batch_size, (self.img_size,) * spec.arg("spatial_dims"))
            if problem:
                raise ValueError(problem)


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
    """(max |a - b|, max |b|) in float64, over the finite values.

    Whether ``a`` and ``b`` can be compared at all is ``torch.testing.assert_close``'s call (same shape, NaN and
    infinities in the same places, any dtype or device): when they cannot, the difference is infinite. Only the
    size of the difference is left to measure here, since the caller's tolerance is relative to a whole group of
    tensors (see ``compare_tensors``) rather than per element.
    """
    a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
    try:
        # No tolerance on finite values (atol inf): this checks shape and the places of NaN and +-inf only.
        torch.testing.assert_close(a64, b64, rtol=0.0, atol=math.inf, equal_nan=True)
    except AssertionError:
        return math.inf, 0.0
    finite = b64.isfinite()  # the same places in a64, as assert_close found
    if not finite.any():
        return 0.0, 0.0
    return (a64 - b64)[finite].abs().max().item(), b64[finite].abs().max().item()


def compare_tensors(group: str, case: str, subject: str, what: str, got: dict[str, Tensor | None],
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
        if not b.isfinite().all():  # NaN == NaN would pass as "bitwise equal" without comparing anything
            problems.append(f"{name}: plain's is not finite")
            worst_abs, worst_name = math.inf, worst_name or name
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


def batch_norms_of(model: nn.Module) -> Iterator[nn.modules.batchnorm._BatchNorm]:
    return (m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))


def perturb_running_stats(model: nn.Module, seed: int) -> None:
    """Non-default running statistics, so an extra or missing update shows in every buffer."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in batch_norms_of(model):
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


def grads_of(model: nn.Module) -> dict[str, Tensor | None]:
    return {n: None if p.grad is None else p.grad.detach().clone() for n, p in _underlying(model).named_parameters()}


def params_of(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in _underlying(model).named_parameters()}


def buffers_of(model: nn.Module, integer: bool) -> dict[str, Tensor]:
    return {n: b.detach().clone() for n, b in _underlying(model).named_buffers()
            if b.is_floating_point() != integer}


def input_shape(img: int, spatial_dims: int) -> str:
    """An input's spatial size as the report shows it: ``32x32``, ``16x16x16`` or ``64``."""
    return "x".join([str(img)] * spatial_dims)


def input_batch(spec: ModelSpec, batch: int, img: int, dtype: torch.dtype, device: torch.device, seed: int,
           channels_last: bool = False) -> tuple[Tensor, Tensor]:
    """A batch the spec's model takes: ``img`` along each of its spatial dims (a square, a cube or a length), of
    ``dtype`` (the harness's batch)."""
    return make_batch(spec, batch, img, device, channels_last, seed, dtype)


def set_deterministic(device: torch.device) -> None:
    # Exactness is about the model, not about kernels that may pick a different algorithm or precision per call.
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


# Short names: they are the columns of the report's mode table.
TRAIN_CHECKS = {"output": "output", "loss": "loss", "grads": "grads", "stats": "BN stats",
                 "counts": "BN count"}
FINAL_CHECKS = {"params": "params", "eval output": "eval output", "eval grads": "eval grads",
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


RAN = "ran without error"
