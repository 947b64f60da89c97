"""Weight conversion between torchvision, timm, MONAI and effidense DenseNet checkpoints, and 2D -> 3D inflation.

torchvision, timm and effidense state dicts share their keys, so converting is mostly checking; MONAI's (2D) differ
only in names (``...denselayer1.layers.norm1.weight``, ``class_layers.out.*``): :data:`KEY_RULES` is the one table of
what differs, :func:`layout_limits` says which architectures each layout can hold, :func:`inflate` makes 2D weights
3D (I3D). Reads ``.pth``/``.pt``/``.bin`` (``torch.load(weights_only=True)``, also wrapped as ``{'state_dict': ...}``
or ``{'model': ...}``) and ``.safetensors``; writes ``.safetensors`` with the architecture in its header, or a plain
``.pth`` state dict. Every failure raises :class:`ConversionError` with a one-line message.
"""
from __future__ import annotations

import functools
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .adapt import adapt_state_dict
from .configs import CONFIGS, unknown_model_message
from .densenet import DenseNet
from .fcdensenet import FCDENSENET_CONFIGS
from .fcdensenet_weights import (
    FCDenseNetArchitecture,
    convert_fcdensenet_state_dict,
    is_fcdensenet_state_dict,
    verify_fcdensenet,
)
from .fileio import short_error
from .harness.variants import build_peer, peer_limits
from .layouts import INFLATE_METHODS, LAYOUT_ALIASES, LAYOUTS, VERIFY_TOLERANCE
from .modelspec import Architecture
from .weights import (
    KEY_RULES,
    Checkpoint,
    ConversionError,
    VerificationError,
    canonical_key,
    canonical_state_dict,
    check_output,
    complete_state_dict,
    describe_misfit,
    has_layout_keys,
    has_legacy_keys,
    is_activation_key,
    is_bn_counter,
    layout_key,
    layout_state_dict,
    listing,
    load_checkpoint,
    output_format,
    save_checkpoint,
    timm_pretrained_filter,
    values_problem,
)

__all__ = [
    "FORMAT_VERSION", "LAYOUTS", "KEY_RULES", "VERIFY_TOLERANCE", "Architecture", "Checkpoint", "Conversion",
    "ConversionError", "INFLATE_METHODS", "VerificationError", "build_layout_model", "canonical_state_dict",
    "check_state_dict", "convert_checkpoint", "convert_state_dict", "infer_architecture", "inflate", "layout_limits",
    "layout_state_dict", "load_checkpoint", "match_config", "resolve_layout", "resolve_model_name", "save_checkpoint",
    "timm_pretrained_filter", "verify_conversion",
]

FORMAT_VERSION = "1"

_META_PREFIX = "effidense."


# --- architectures ---

def _config_architecture(name: str, num_classes: int, in_chans: int) -> Architecture:
    return Architecture.from_kwargs(CONFIGS[name], num_classes=num_classes, in_chans=in_chans)


def resolve_model_name(name: str) -> str:
    """``densenet121`` or ``effi_densenet121`` -> the :data:`effidense.CONFIGS` key."""
    key = name.removeprefix("effi_")
    if key in FCDENSENET_CONFIGS:  # FC-DenseNet weights never ask: they are checked on their own path
        raise ConversionError(f"{name} is an FC-DenseNet, but the weights are a DenseNet's ('features.*' keys)")
    if key not in CONFIGS:
        raise ConversionError(unknown_model_message(name, [f"effi_{n}" for n in CONFIGS] + list(CONFIGS)))
    return key


def match_config(arch: Architecture) -> str | None:
    """The :data:`effidense.CONFIGS` name whose network ``arch`` is (classes and input channels may differ)."""
    for name in CONFIGS:
        if _config_architecture(name, arch.num_classes, arch.in_chans) == arch:
            return name
    return None


def layout_limits(layout: str, arch: Architecture) -> list[str]:
    """Why ``layout``'s DenseNet class cannot hold ``arch`` (empty when it can; :func:`.harness.peer_limits`)."""
    layout = resolve_layout(layout)
    return [] if layout == "effidense" else peer_limits(layout, arch.spec())


def resolve_layout(name: str) -> str:
    """A layout name, with the seed converter's ``efficient``/``normal`` accepted."""
    layout = LAYOUT_ALIASES.get(name, name)
    if layout not in LAYOUTS:
        raise ConversionError(f"unknown layout {name!r}; choose one of: {', '.join(LAYOUTS + tuple(LAYOUT_ALIASES))}")
    return layout


def _shape(state_dict: Mapping[str, Tensor], key: str, ndim: int) -> tuple[int, ...] | None:
    value = state_dict.get(key)
    return tuple(value.shape) if isinstance(value, Tensor) and value.dim() == ndim else None


def _compression(out_chs: int, in_chs: int) -> float:
    """The compression that turns ``in_chs`` into ``out_chs`` channels (DenseNet computes int(channels * c))."""
    compression = out_chs / in_chs
    if int(in_chs * compression) != out_chs:
        compression = float(torch.nextafter(torch.tensor(compression, dtype=torch.float64),
                                            torch.tensor(2.0, dtype=torch.float64)))
    return compression


def _votes(state_dict: Mapping[str, Tensor], block_config: tuple[int, ...],
           bottleneck: bool) -> dict[str, Counter[Any]]:
    """What each tensor's shape says about each number of the architecture: one vote per key that tells it, so that
    one corrupt tensor is outvoted by the others instead of deciding alone."""
    votes: dict[str, Counter[Any]] = {name: Counter() for name in (
        "in_chans", "num_init_features", "growth_rate", "bn_size", "compression", "num_classes")}

    def shape(key: str, ndim: int) -> tuple[int, ...] | None:
        return _shape(state_dict, key, ndim)

    conv0 = shape("features.conv0.weight", 4)
    if conv0 is not None:
        votes["num_init_features"][conv0[0]] += 1
        votes["in_chans"][conv0[1]] += 1
    for key in ("features.norm0.weight", "features.denseblock1.denselayer1.norm1.weight"):
        if (norm := shape(key, 1)) is not None:
            votes["num_init_features"][norm[0]] += 1
    for b, layers in enumerate(block_config, 1):
        for i in range(1, layers + 1):
            prefix = f"features.denseblock{b}.denselayer{i}."
            conv1, conv2 = shape(prefix + "conv1.weight", 4), shape(prefix + "conv2.weight", 4)
            if bottleneck and conv2 is not None:
                votes["growth_rate"][conv2[0]] += 1
                if conv1 is not None and conv2[0] and conv1[0] % conv2[0] == 0:
                    votes["bn_size"][conv1[0] // conv2[0]] += 1
            elif not bottleneck and conv1 is not None:
                votes["growth_rate"][conv1[0]] += 1
        if b == len(block_config):
            continue
        transition = f"features.transition{b}."
        conv = shape(transition + "conv.weight", 4)
        if conv is not None and conv[1]:
            votes["compression"][_compression(conv[0], conv[1])] += 1
        # the next block's first layer normalises the transition's output
        norm = shape(transition + "norm.weight", 1)
        after = shape(f"features.denseblock{b + 1}.denselayer1.norm1.weight", 1)
        if norm is not None and after is not None and norm[0]:
            votes["compression"][_compression(after[0], norm[0])] += 1
    for key, ndim in (("classifier.weight", 2), ("classifier.bias", 1)):
        if (classifier := shape(key, ndim)) is not None:
            votes["num_classes"][classifier[0]] += 1
    return votes


def _disagreements(state_dict: Mapping[str, Tensor], arch: Architecture) -> int:
    """How many keys ``arch`` does not explain: unknown, missing (but BatchNorm counters) or mis-shaped."""
    expected = _expected_shapes(arch)
    wrong = sum(1 for k, v in state_dict.items() if tuple(v.shape) != expected.get(k))
    return wrong + sum(1 for k in expected if k not in state_dict and not is_bn_counter(k))


def infer_architecture(state_dict: Mapping[str, Tensor]) -> Architecture:
    """Read the architecture off canonical DenseNet weights (see :func:`canonical_state_dict`).

    The block structure comes from the key names; every number (stem width, growth rate, bottleneck, compression,
    classes, input channels) from a vote of every tensor that tells it. When that architecture leaves keys
    unexplained, the candidates are the named :data:`effidense.CONFIGS` and each single change to a number that some
    key voted for; the one with the fewest disagreeing keys wins, so a corrupt tensor is blamed, not its neighbours.
    """
    dims = _spatial_dims(state_dict)
    if dims != 2:  # 1D or 3D weights: the same numbers as the 2D network with square kernels
        return replace(infer_architecture(_planar(state_dict, dims)), spatial_dims=dims)
    if _shape(state_dict, "features.conv0.weight", 4) is None:
        raise ConversionError("not a DenseNet or FC-DenseNet checkpoint: no 4-d 'features.conv0.weight' (a "
                              "DenseNet's first convolution) and no 'stem.weight' (an FC-DenseNet's) "
                              f"(keys: {listing(state_dict)})")
    small_inputs = "features.norm0.weight" not in state_dict
    layers: dict[int, int] = {}
    for key in state_dict:
        m = re.match(r"features\.denseblock(\d+)\.denselayer(\d+)\.", key)
        if m:
            block, layer = int(m[1]), int(m[2])
            layers[block] = max(layers.get(block, 0), layer)
    if not layers:
        raise ConversionError("not a DenseNet checkpoint: no 'features.denseblockN.denselayerM.*' keys")
    block_config = tuple(layers.get(b, 0) for b in range(1, max(layers) + 1))
    if 0 in block_config:
        raise ConversionError(f"denseblock{block_config.index(0) + 1} has no layers in this checkpoint")
    first = "features.denseblock1.denselayer1."
    if _shape(state_dict, first + "conv1.weight", 4) is None:
        raise ConversionError(f"cannot read the growth rate: no 4-d '{first}conv1.weight'")
    bottleneck = any(re.match(r"features\.denseblock\d+\.denselayer\d+\.conv2\.weight$", k) for k in state_dict)
    votes = _votes(state_dict, block_config, bottleneck)
    if bottleneck and not votes["bn_size"]:
        conv1, conv2 = _shape(state_dict, first + "conv1.weight", 4), _shape(state_dict, first + "conv2.weight", 4)
        raise ConversionError(f"bottleneck width {conv1[0]} of '{first}conv1.weight' is not a multiple of the "
                              f"growth rate {conv2[0] if conv2 else '?'}")
    defaults = {"bn_size": 4 if bottleneck else None, "compression": 0.5, "num_classes": 0}
    # most_common keeps first-seen order among equal counts: the earliest key decides a tie, as it used to alone
    majority = {name: counter.most_common(1)[0][0] if counter else defaults[name] for name, counter in votes.items()}
    if not bottleneck:
        majority["bn_size"] = None
    base = Architecture(block_config=block_config, small_inputs=small_inputs, **majority)
    candidates = [base]
    # a named network with other blocks disagrees on whole layers, so only those with these blocks can win
    named = [arch for arch in (_config_architecture(n, base.num_classes, base.in_chans) for n in CONFIGS)
             if arch.block_config == block_config and arch != base]
    variants = [Architecture(**{**base.model_kwargs(), name: value})
                for name, counter in votes.items() for value, _ in counter.most_common(6) if value != majority[name]]
    best, best_count, first_error = None, 0, None
    for arch in candidates + named + variants:
        try:
            count = _disagreements(state_dict, arch)
        except ValueError as e:  # not a valid DenseNet
            first_error = first_error or e
            continue
        if best is None or count < best_count:
            best, best_count = arch, count
        if best_count == 0:
            break
    if best is None:
        raise ConversionError(f"the weights describe no valid DenseNet: {first_error}") from None
    return best


def _spatial_dims(state_dict: Mapping[str, Tensor]) -> int:
    """The spatial dimensions of DenseNet weights, from the stem's kernel (2 when it tells none)."""
    conv0 = state_dict.get("features.conv0.weight")
    return conv0.dim() - 2 if isinstance(conv0, Tensor) and conv0.dim() in (3, 5) else 2


def _planar(state_dict: Mapping[str, Tensor], dims: int) -> dict[str, Tensor]:
    """Shapes only (meta tensors): each kernel of ``dims``-D weights as a 2D one of its last side."""
    return {key: torch.empty(tuple(value.shape[:2]) + (value.shape[-1],) * 2, device="meta")
            if value.dim() == dims + 2 else value for key, value in state_dict.items()}


@functools.lru_cache(maxsize=32)
def _expected_shapes(arch: Architecture) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = DenseNet(**arch.model_kwargs())
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}



def check_state_dict(state_dict: Mapping[str, Tensor], arch: Architecture, what: str = "",
                     layout: str = "effidense") -> None:
    """Raise :class:`ConversionError` listing every unknown, missing and mis-shaped key of ``state_dict`` for
    ``arch``. Missing BatchNorm ``num_batches_tracked`` counters are fine (old checkpoints predate them).

    ``state_dict`` may use any layout's names (:data:`KEY_RULES`); unknown and mis-shaped keys are named as in
    ``state_dict``, missing ones in ``layout``'s names."""
    expected = _expected_shapes(arch)
    named = {canonical_key(k): k for k in state_dict}  # canonical name -> the name in state_dict
    layout = resolve_layout(layout)
    unknown = [k for c, k in named.items() if c not in expected]
    missing = [layout_key(k, layout) for k in expected if k not in named and not is_bn_counter(k)]
    mismatched = [(k, tuple(state_dict[k].shape), expected[c]) for c, k in named.items()
                  if c in expected and tuple(state_dict[k].shape) != expected[c]]
    if not (unknown or missing or mismatched):
        return
    target = what or f"DenseNet({arch.describe()})"
    raise ConversionError(f"the weights do not fit {target}: " + describe_misfit(unknown, missing, mismatched),
                          unknown=unknown, missing=missing, mismatched=mismatched)


# --- converting ---

@dataclass
class Conversion:
    """A converted state dict and what is known about it."""

    state_dict: dict[str, Tensor]
    architecture: Architecture | FCDenseNetArchitecture
    model_name: str | None
    source: str
    target: str
    notes: list[str] = field(default_factory=list)
    inflation: str | None = None  # the inflate() method that made these 3D weights, or None for 2D

    @property
    def spatial_dims(self) -> int:
        return self.architecture.spatial_dims

    def metadata(self, source_file: str = "") -> dict[str, str]:
        """The safetensors header entries describing this checkpoint (all strings, as safetensors requires)."""
        meta = {
            "format": "pt",  # what timm and transformers expect in a safetensors header
            _META_PREFIX + "format_version": FORMAT_VERSION,
            _META_PREFIX + "layout": self.target,
            _META_PREFIX + "source_layout": self.source,
            _META_PREFIX + "network": getattr(self.architecture, "network", "DenseNet"),
            _META_PREFIX + "architecture": self.architecture.to_json(),
            _META_PREFIX + "model": self.model_name or "",
            _META_PREFIX + "spatial_dims": str(self.spatial_dims),
        }
        if self.inflation is not None:
            meta[_META_PREFIX + "inflation"] = self.inflation
        if source_file:
            meta[_META_PREFIX + "source_file"] = os.path.basename(source_file)
        return meta


def _detect_source(raw_keys: Iterable[str], metadata: Mapping[str, str], arch: Architecture) -> tuple[str, str]:
    keys = dict.fromkeys(raw_keys)
    monai_names = has_layout_keys(keys, "monai")
    claimed, overruled = metadata.get(_META_PREFIX + "layout"), ""
    if claimed in LAYOUTS:
        # the header is only as true as whoever wrote it: the weights themselves have the last word
        limits = layout_limits(claimed, arch)
        if claimed == "monai" and not monai_names:
            overruled = "its keys are not MONAI's"
        elif claimed != "monai" and monai_names:
            overruled = "its keys are MONAI's"
        elif limits:
            overruled = f"{claimed}'s DenseNet cannot hold these weights ({'; '.join(limits)})"
        else:
            return claimed, "from the file's metadata"
        overruled = f"; the file's metadata says {claimed}, but {overruled}"
    if monai_names:
        return "monai", "MONAI key names" + overruled
    if has_legacy_keys(keys):
        return "torchvision", "legacy torchvision key names" + overruled
    if layout_limits("torchvision", arch):
        return "effidense", "only effidense has this architecture" + overruled
    return "torchvision", "modern torchvision and timm keys are identical; torchvision assumed" + overruled


def _check_limits(layout: str, role: str, arch: Architecture) -> None:
    reasons = layout_limits(layout, arch)
    if reasons:
        raise ConversionError(f"{role} layout {layout}: its DenseNet cannot hold these weights: " + "; ".join(reasons))


def convert_state_dict(
        state_dict: Mapping[str, Tensor],
        source: str = "auto",
        target: str = "effidense",
        model: str | None = None,
        metadata: Mapping[str, str] | None = None,
        inflate: str | None = None,
        in_chans: int | None = None,
        num_classes: int | None = None,
) -> Conversion:
    """Convert a state dict from ``source`` layout (``auto`` detects it) to ``target``.

    The weights may be 1D, 2D or 3D (MONAI's 3D checkpoints, effidense's). The architecture is inferred from the
    weights; with ``model`` (a :data:`effidense.CONFIGS` name, ``effi_`` prefix allowed) the weights must fit that
    network instead. Keys that do not fit are named as in ``state_dict`` (missing ones in the source layout's
    names). With ``inflate`` (``"mean"`` or ``"center"``, see :func:`inflate`) 2D weights become 3D ones for the same
    network with 3D layers; ``in_chans`` adapts the first convolution and ``num_classes`` gives a fresh classifier
    (:func:`effidense.adapt.adapt_state_dict`). Raises :class:`ConversionError`.
    """
    target = resolve_layout(target)
    if inflate is not None and inflate not in INFLATE_METHODS:
        raise ConversionError(f"unknown inflation method {inflate!r}; choose one of: {', '.join(INFLATE_METHODS)}")
    if source != "auto":
        source = resolve_layout(source)
    canonical, notes = canonical_state_dict(state_dict)
    problem = values_problem(canonical)
    if problem:  # NaN or integer "weights" would convert (and verify) without a complaint
        raise ConversionError(problem)
    activations = [k for k in canonical if is_activation_key(k)]
    if activations:
        more = f" and {len(activations) - 1} more" if len(activations) > 1 else ""
        raise ConversionError(
            f"the weights hold activation parameters ({activations[0]}{more}), as MONAI's act='prelu' makes: "
            "effidense convert converts DenseNets with parameter-free activations (torchvision's and timm's have no "
            "other); effidense.monai loads these as they are, e.g. effidense.monai.DenseNet121(spatial_dims, "
            "in_channels, out_channels, act='prelu').load_state_dict(weights)")
    if is_fcdensenet_state_dict(canonical):  # the segmentation network: its own architecture, one layout
        adapt = inflate is not None or in_chans is not None or num_classes is not None
        out, fcd, name, more = convert_fcdensenet_state_dict(canonical, source, target, model, adapt=adapt)
        return Conversion(out, fcd, name, "effidense", "effidense", notes + more)
    naming = source if source != "auto" else "monai" if has_layout_keys(state_dict, "monai") else "effidense"
    name = None
    if model is not None:
        name = resolve_model_name(model)
        conv0 = canonical.get("features.conv0.weight")
        classifier = _shape(canonical, "classifier.weight", 2)
        channels = conv0.shape[1] if isinstance(conv0, Tensor) and conv0.dim() >= 2 else 3
        arch = replace(_config_architecture(name, classifier[0] if classifier else 0, channels),
                       spatial_dims=_spatial_dims(canonical))
        check_state_dict(state_dict, arch, what=name, layout=naming)
    else:
        arch = infer_architecture(canonical)
        name = match_config(replace(arch, spatial_dims=2))
        check_state_dict(state_dict, arch, what=f"{name or 'DenseNet'}({arch.describe()}), the architecture that "
                                                "explains the most keys", layout=naming)
    if source == "auto":
        source, why = _detect_source(state_dict, metadata or {}, arch)
        notes.insert(0, f"source layout {source} ({why})")
    _check_limits(source, "source", arch)
    out, more_notes = complete_state_dict(canonical, _expected_shapes(arch))
    if inflate is not None or in_chans is not None or num_classes is not None:
        out, adapted = adapt_state_dict(out, method=inflate, in_chans=in_chans, num_classes=num_classes)
        more_notes += adapted
        conv0, classifier = out["features.conv0.weight"], out.get("classifier.weight")
        arch = replace(arch, spatial_dims=conv0.dim() - 2, in_chans=conv0.shape[1],
                       num_classes=classifier.shape[0] if classifier is not None else 0)
    _check_limits(target, "target", arch)  # what is written: 3D weights are no torchvision's, say
    return Conversion(layout_state_dict(out, target), arch, name, source, target, notes + more_notes, inflate)


# --- 2D -> 3D ---

def inflate(state_dict: Mapping[str, Tensor], spatial_dims: int = 3, method: str = "mean", *, to: str | None = None,
            in_chans: int | None = None, num_classes: int | None = None) -> dict[str, Tensor]:
    """A 2D DenseNet state dict as 3D weights for the same network with 3D layers (I3D inflation, Carreira &
    Zisserman 2017). Everything but the kernels is copied; each k x k kernel becomes k x k x k:

    * ``"mean"`` (I3D's): the kernel repeated over a depth of k and divided by k. On an input that is constant along
      depth the 3D network computes the 2D one's features on every slice, except near the first and last slices,
      where zero padding (of the 3x3 and 7x7 convolutions) breaks the sum over depth taps.
    * ``"center"``: the kernel at the middle depth tap, the other taps zero: exact on such an input at every slice,
      so the pooled features equal the 2D network's on one slice.

    ``to`` names the layout whose keys the result has (``"monai"`` for :mod:`effidense.monai` and MONAI's
    ``DenseNet``, ``"effidense"``, ...); None keeps the keys as given (torchvision, timm, effidense or MONAI names).
    ``in_chans`` adapts the first convolution to that many input channels (the sum over RGB, shared out:
    :func:`effidense.adapt.adapt_input_channels`) and ``num_classes`` puts a fresh classifier on (0: none), so the
    result loads with ``strict=True`` into e.g. ``effidense.monai.DenseNet121(spatial_dims=3, in_channels=1,
    out_channels=2)``.

    The weights are checked first (unknown, missing and mis-shaped keys are named). Raises :class:`ConversionError`.
    """
    if spatial_dims != 3:
        raise ConversionError(f"spatial_dims={spatial_dims!r}: 2D kernels inflate to 3D only (spatial_dims=3)")
    if method not in INFLATE_METHODS:
        raise ConversionError(f"unknown inflation method {method!r}; choose one of: {', '.join(INFLATE_METHODS)}")
    if to is not None:
        return convert_state_dict(state_dict, target=to, inflate=method, in_chans=in_chans,
                                  num_classes=num_classes).state_dict
    convert_state_dict(state_dict)  # a DenseNet whose every key fits, or one line saying why not
    return adapt_state_dict(state_dict, method=method, in_chans=in_chans, num_classes=num_classes)[0]


# --- verifying ---

def build_layout_model(layout: str, arch: Architecture) -> nn.Module:
    """A randomly initialised DenseNet of ``layout``'s own class (torchvision's, timm's, MONAI's or effidense's;
    only this needs the peer library installed; built by :func:`effidense.harness.build_peer`)."""
    layout = resolve_layout(layout)
    if layout == "effidense":
        return DenseNet(**arch.model_kwargs())
    try:
        return build_peer(layout, arch.spec("this architecture"))
    except ValueError as e:
        extra = "; converting to or from its layout does not" if layout == "monai" and "pip install" in str(e) else ""
        raise ConversionError(f"{e}{extra}") from None


def _outputs(model: nn.Module, x: Tensor) -> Tensor:
    """Pooled features followed by the logits (if any), for any of the four DenseNet classes."""
    if hasattr(model, "forward_head"):
        features = model.forward_features(x)
        pooled, logits = model.forward_head(features, pre_logits=True), model.forward_head(features)
    elif hasattr(model, "class_layers"):  # MONAI: class_layers = ReLU, pooling, flatten, out (the classifier)
        pooled = model.class_layers[:-1](model.features(x))
        logits = model.class_layers.out(pooled)
    else:  # torchvision: features end at norm5; its forward adds ReLU, pooling and the classifier
        pooled = F.adaptive_avg_pool2d(F.relu(model.features(x)), 1).flatten(1)
        logits = model.classifier(pooled)
    return torch.cat([pooled, logits], 1)


def verify_conversion(
        source_state_dict: Mapping[str, Tensor],
        source_layout: str,
        target_state_dict: Mapping[str, Tensor],
        target_layout: str,
        arch: Architecture,
        batch_size: int = 2,
        seed: int = 0,
) -> float:
    """Max abs difference between the source layout's model with the source weights and the target layout's model
    with the converted weights, on one random batch in eval mode (fp32): pooled features and logits. The weights may
    use any layout's names; each model gets them in its own."""
    models = []
    for layout, state_dict in ((source_layout, source_state_dict), (target_layout, target_state_dict)):
        model = build_layout_model(layout, arch)
        state_dict = layout_state_dict(canonical_state_dict(state_dict)[0], resolve_layout(layout))
        try:
            model.load_state_dict(state_dict, strict=True)
        except RuntimeError as e:
            raise ConversionError(f"{layout} model refused the weights: {short_error(e)}") from None
        models.append(model.float().eval())
    # volumes are small: a 32^3 batch already runs DenseNet-121 down to 1^3
    size = 32 if arch.small_inputs or arch.spatial_dims == 3 else 64
    size = max([size, *(model.min_input_size for model in models if hasattr(model, "min_input_size"))])
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, arch.in_chans, *(size,) * arch.spatial_dims, generator=generator)
    with torch.no_grad():
        reference, converted = (_outputs(model, x) for model in models)
    return (reference - converted).abs().max().item()


def convert_checkpoint(
        checkpoint: str | os.PathLike[str],
        output: str | os.PathLike[str],
        target: str = "effidense",
        source: str = "auto",
        fmt: str | None = None,
        model: str | None = None,
        use_ema: bool = False,
        verify: bool = False,
        force: bool = False,
        tolerance: float = VERIFY_TOLERANCE,
        inflate: str | None = None,
        in_chans: int | None = None,
        num_classes: int | None = None,
) -> tuple[Conversion, float | None]:
    """Read ``checkpoint``, convert it to ``target`` layout and write ``output`` (see :func:`convert_state_dict`;
    ``inflate`` writes 3D weights, see :func:`inflate`; ``in_chans`` and ``num_classes`` adapt the first convolution
    and give a fresh classifier).

    With ``verify`` the written file is read back and checked with :func:`verify_conversion` before it replaces
    anything; a difference above ``tolerance`` raises :class:`VerificationError` and leaves no output. Returns the
    conversion and the measured difference (None without ``verify``).
    """
    output = Path(output)
    if verify and (inflate is not None or in_chans is not None or num_classes is not None):
        raise ConversionError("verify compares models that compute the same function, and inflating, adapting the "
                              "input channels or a fresh classifier changes it; verify a plain conversion, then adapt")
    fmt = output_format(output, fmt)
    check_output(output, force)  # fail before the work, not after it
    loaded = load_checkpoint(checkpoint, use_ema=use_ema)
    conversion = convert_state_dict(loaded.state_dict, source=source, target=target, model=model,
                                     metadata=loaded.metadata, inflate=inflate, in_chans=in_chans,
                                     num_classes=num_classes)
    conversion.notes[:0] = loaded.notes
    diff: list[float] = []

    def check(written: Path) -> None:
        reread = load_checkpoint(written).state_dict
        source_weights, _ = canonical_state_dict(loaded.state_dict)
        between = f"{conversion.source} and {conversion.target} models"
        if isinstance(conversion.architecture, FCDenseNetArchitecture):  # every memory mode against plain
            diffs = verify_fcdensenet(source_weights, reread, conversion.architecture)
            which = max(diffs, key=lambda k: math.inf if math.isnan(diffs[k]) else diffs[k])  # a NaN is the worst
            diff.append(diffs[which])
            between = f"plain FCDenseNet and the {which}"
            compared = ", ".join(list(diffs)[:-1]) + f" and {list(diffs)[-1]}"
            conversion.notes.append(f"verify compared {compared} with the plain FCDenseNet of the input weights")
        else:
            diff.append(verify_conversion(source_weights, conversion.source, reread, conversion.target,
                                          conversion.architecture))
        if not math.isfinite(diff[-1]):  # finite weights (checked on load) can still overflow: say so, not "nan"
            raise VerificationError("verification impossible: the models' outputs are not finite on the verification "
                                    f"batch; {output} not written", diff[-1])
        if not diff[-1] <= tolerance:
            raise VerificationError(f"verification failed: max abs difference {diff[-1]:.3g} between the "
                                    f"{between} exceeds {tolerance:g}; "
                                    f"{output} not written", diff[-1])

    save_checkpoint(conversion.state_dict, output, fmt=fmt, metadata=conversion.metadata(str(checkpoint)),
                    force=force, check=check if verify else None)
    return conversion, (diff[-1] if diff else None)
