"""Named DenseNet configurations, their builders and the timm registry.

``import effidense`` registers the ``effi_*`` models, so ``timm.create_model('effi_densenet121')`` works; builders
such as :func:`densenet121` build the same networks without timm's machinery.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from huggingface_hub.errors import LocalEntryNotFoundError
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model, resolve_pretrained_cfg
from timm.models._features import FeatureGetterNet
from torch import nn

from .configs import CONFIGS, unknown_model_message
from .densenet import DenseNet
from .dilation import dilate
from .fileio import content_format
from .layers.norm import BATCH_NORM_ACT, AdoptsNorms, BatchNormAct2d
from .pretrained import (
    TORCHVISION_WEIGHTS,
    not_found_error,
    torchvision_cache_file,
    torchvision_weights,
)
from .weights import PTH_SUFFIXES, ConversionError, timm_pretrained_filter

__all__ = ["CONFIGS", "TORCHVISION_WEIGHTS", "DenseNetFeatures", "create", "resolve_weights", "weight_tags",
           "densenet121", "densenet161", "densenet169", "densenet201", "densenet264",
           "densenet40_k12", "densenet_bc100_k12", "densenet_bc250_k24", "densenet_bc190_k40"]


def densenet121(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> DenseNet:
    """DenseNet-121 (k=32), ImageNet. Weights: tv_in1k (default; torchvision's, = IMAGENET1K_V1), ra_in1k (timm's)."""
    return create("densenet121", weights=weights, progress=progress, **kwargs)


def densenet161(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> DenseNet:
    """DenseNet-161 (k=48), ImageNet. Weights: tv_in1k (torchvision's, = IMAGENET1K_V1)."""
    return create("densenet161", weights=weights, progress=progress, **kwargs)


def densenet169(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> DenseNet:
    """DenseNet-169 (k=32), ImageNet. Weights: tv_in1k (torchvision's, = IMAGENET1K_V1)."""
    return create("densenet169", weights=weights, progress=progress, **kwargs)


def densenet201(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> DenseNet:
    """DenseNet-201 (k=32), ImageNet. Weights: tv_in1k (torchvision's, = IMAGENET1K_V1)."""
    return create("densenet201", weights=weights, progress=progress, **kwargs)


def densenet264(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> DenseNet:
    """DenseNet-264 (k=32), ImageNet. No pretrained weights."""
    return create("densenet264", weights=weights, progress=progress, **kwargs)


def densenet40_k12(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> DenseNet:
    """DenseNet-40 (k=12, no bottleneck, no compression), CIFAR. No pretrained weights."""
    return create("densenet40_k12", weights=weights, progress=progress, **kwargs)


def densenet_bc100_k12(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> DenseNet:
    """DenseNet-BC-100 (k=12), CIFAR. No pretrained weights."""
    return create("densenet_bc100_k12", weights=weights, progress=progress, **kwargs)


def densenet_bc250_k24(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> DenseNet:
    """DenseNet-BC-250 (k=24), CIFAR. No pretrained weights."""
    return create("densenet_bc250_k24", weights=weights, progress=progress, **kwargs)


def densenet_bc190_k40(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> DenseNet:
    """DenseNet-BC-190 (k=40), CIFAR. No pretrained weights."""
    return create("densenet_bc190_k40", weights=weights, progress=progress, **kwargs)


# --- weights: torchvision's interface over timm's tags ---

TORCHVISION_CLASSES = 1000  # the classes of every torchvision weight (ImageNet-1k)


def weight_tags(name: str) -> list[str]:
    """The pretrained tags of model ``name`` (a :data:`CONFIGS` key), its default first; empty for untrained ones."""
    import timm

    model = f"effi_{name}"
    tags = [t.split(".", 1)[1] for t in timm.list_pretrained(model)]
    if not tags:
        return []
    default = timm.models.get_pretrained_cfg(model).tag
    return [default, *(t for t in tags if t != default)]


def resolve_weights(name: str, weights: Any = None, pretrained: bool | None = None) -> tuple[str | None, bool]:
    """The timm tag that ``weights`` (or the deprecated ``pretrained``) asks for, None for random initialisation,
    and whether it was asked for in torchvision's spelling (which fixes ``num_classes`` to 1000, as in torchvision).

    ``weights`` may be None, ``"DEFAULT"``, torchvision's ``"IMAGENET1K_V1"`` / ``"DenseNet121_Weights.IMAGENET1K_V1"``
    / the enum member ``torchvision.models.DenseNet121_Weights.IMAGENET1K_V1``, or a timm tag (``"tv_in1k"``,
    ``"ra_in1k"``). Raises ValueError with one line naming the allowed values.
    """
    if pretrained is not None:
        if weights is not None:
            raise ValueError(f"{name}: pass weights= or the deprecated pretrained=, not both")
        warnings.warn(f"{name}: pretrained= is deprecated (as in torchvision); use weights='DEFAULT' or weights=None",
                      UserWarning, stacklevel=4)
        if not pretrained:
            return None, False
        weights = "DEFAULT"
    if weights is None:
        return None, False
    tags = weight_tags(name)
    label = weights_label(weights)
    owner, _, text = label.rpartition(".")  # "DenseNet121_Weights.IMAGENET1K_V1" -> "IMAGENET1K_V1"
    expected = "DenseNet" + name.removeprefix("densenet") + "_Weights"
    if tags:
        choices = ", ".join(["None", *(repr(c) for c in ["DEFAULT", *TORCHVISION_WEIGHTS, *tags]),
                             f"torchvision.models.{expected}.IMAGENET1K_V1"])
    else:
        choices = "None (no pretrained weights exist for this model)"
    if is_file_path(weights):
        path = os.fspath(weights)
        raise ValueError(f"{name}: weights={path!r} names a file, but weights= takes a name: {choices}; load a file "
                         f"with model.load_state_dict(effidense.weights.load_checkpoint({path!r}).state_dict)")
    if owner and owner != expected:
        raise ValueError(f"{name}: weights {label} are {owner}'s, not {expected}'s; choose one of: {choices}")
    if not tags:
        raise ValueError(f"{name}: no pretrained weights exist (untrained model), got weights={label!r}; "
                         f"choose {choices}")
    tag = tags[0] if text == "DEFAULT" else TORCHVISION_WEIGHTS.get(text, text)
    if tag not in tags:
        raise ValueError(f"{name}: unknown weights {label!r}; choose one of: {choices}")
    return tag, text == "DEFAULT" or text in TORCHVISION_WEIGHTS


def is_file_path(weights: Any) -> bool:
    """Whether ``weights`` names a file rather than weights (a path, a name with a directory or a checkpoint's
    suffix): torchvision's names never have either."""
    if isinstance(weights, os.PathLike):
        return True
    if not isinstance(weights, str):
        return False
    return ("/" in weights or os.sep in weights or weights.lower().endswith((".safetensors", *PTH_SUFFIXES))
            or os.path.isfile(weights))


def weights_label(weights: Any) -> str:
    """``weights`` as text: a torchvision enum member as ``"DenseNet121_Weights.IMAGENET1K_V1"``."""
    if isinstance(weights, str):
        return weights
    name = getattr(weights, "name", None)  # a torchvision WeightsEnum member
    return f"{type(weights).__name__}.{name}" if isinstance(name, str) else repr(weights)


@contextlib.contextmanager
def _hub_progress(enabled: bool) -> Iterator[None]:
    """Hugging Face hub download progress bars on or off for the block (they are where the weights come from)."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    before = not are_progress_bars_disabled()
    if enabled == before:
        yield
        return
    (enable_progress_bars if enabled else disable_progress_bars)()
    try:
        yield
    finally:
        (enable_progress_bars if before else disable_progress_bars)()


def create(name: str, *, weights: Any = None, progress: bool = True, pretrained: bool | None = None,
           **kwargs: Any) -> DenseNet:
    """Model ``name`` (a :data:`CONFIGS` key) with torchvision's builder interface: every builder and every torch.hub
    entry point (``hubconf.py``) comes here.

    ``weights`` as in :func:`resolve_weights` (``pretrained=`` is torchvision's deprecated spelling); the weights come
    as with ``timm.create_model("effi_<name>.<tag>", pretrained=True)``: torchvision's own cached file
    (``$TORCH_HOME/hub/checkpoints/densenet121-a639ec97.pth``) for torchvision's weights, else timm's Hugging Face hub
    repositories or their cache (``HF_HUB_CACHE``, ``HF_HUB_OFFLINE=1``); ``progress`` shows the download. Where
    neither cache has them and the hub cannot be reached, :class:`effidense.pretrained.WeightsNotFoundError` says in
    one line where they were looked for. With torchvision's
    spellings ``num_classes`` must be 1000, as in torchvision; with a timm tag another ``num_classes`` gets a new,
    randomly initialised classifier, as in timm. Other keyword arguments go to :class:`DenseNet` with its meanings
    (``drop_rate`` is dropout after each dense layer, as in torchvision). The model carries timm's ``pretrained_cfg``
    (preprocessing).
    """
    if name not in CONFIGS:
        raise ValueError(unknown_model_message(name, list(CONFIGS)))
    tag, torchvision_spelling = resolve_weights(name, weights, pretrained)
    classes = kwargs.get("num_classes", TORCHVISION_CLASSES)
    if torchvision_spelling and classes != TORCHVISION_CLASSES:
        shown = weights_label(weights) if weights is not None else "DEFAULT"
        raise ValueError(f"{name}: weights {shown!r} have "
                         f"{TORCHVISION_CLASSES} classes but num_classes={classes} (as in torchvision); for a new "
                         f"{classes}-class head on them pass weights={tag!r}")
    # timm's effi_* creators read drop_rate as timm does (the head's dropout); the builders keep DenseNet's meaning
    if "drop_rate" in kwargs:
        kwargs["proj_drop_rate"] = kwargs.pop("drop_rate")
    with _hub_progress(progress):
        return _create(name, tag is not None, pretrained_cfg=tag, **kwargs)


# --- timm registry: `import effidense` makes timm.create_model('effi_densenet121') work ---

def _pretrained_file_problem(path: str) -> str | None:
    """Why timm would fail to read ``path`` as a pretrained file (None when it can): timm picks its reader by the
    name (``.safetensors`` or ``torch.load``), so a file whose content is the other format, or neither, fails there
    with a traceback (``header too large``)."""
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return None  # timm's own error names a missing file
    found = content_format(path)
    named = "safetensors" if path.endswith(".safetensors") else "torch"
    if found == named:
        return None
    if found is None:
        return f"{path}: corrupt or truncated checkpoint (neither a PyTorch nor a safetensors file)"
    what = "a PyTorch checkpoint" if found == "torch" else "a safetensors file"
    suffix = ".pth" if found == "torch" else ".safetensors"
    return f"{path} is {what} despite its name, and timm reads a pretrained file by its name: name it {suffix}"


def _pretrained_file(kwargs: dict[str, Any]) -> str | None:
    # the file timm will load: pretrained_cfg_overlay=dict(file=...) or a pretrained_cfg that names one
    cfg = kwargs.get("pretrained_cfg")
    cfg_file = cfg.get("file") if isinstance(cfg, dict) else getattr(cfg, "file", None)
    return (kwargs.get("pretrained_cfg_overlay") or {}).get("file") or cfg_file


def _torchvision_cached(name: str, kwargs: dict[str, Any]) -> tuple[str | None, str | None, Path | None]:
    """The tag and hub repository of the weights timm would load, and torchvision's cached file of the same weights
    when it names one (None where torchvision has no such weights)."""
    cfg = resolve_pretrained_cfg(f"effi_{name}", pretrained_cfg=kwargs.get("pretrained_cfg"),
                                 pretrained_cfg_overlay=kwargs.get("pretrained_cfg_overlay"))
    weights = torchvision_weights(name, cfg.tag)
    return cfg.tag, cfg.hf_hub_id, torchvision_cache_file(weights) if weights is not None else None


class DenseNetFeatures(AdoptsNorms, FeatureGetterNet):
    """timm's ``features_only`` model of an ``effi_*`` DenseNet. Its modules are those of timm's own DenseNet's
    ``features_only`` model, by the same names (``features_conv0``, ``features_denseblock1``, ...), so its state dict
    and parameter names are that model's and a checkpoint moves between the two either way, as between
    segmentation_models_pytorch's ``tu-densenet121`` and ``tu-effi_densenet121`` encoders. The DenseNet (``model``,
    not a submodule) computes the maps by its own path (``forward_intermediates``, timm's ``FeatureGetterNet``) on
    this model's modules as they are: a norm put in one's place (``convert_sync_batchnorm``, timm's
    ``freeze_batch_norm_2d``) is adopted, exact under recomputation, and DataParallel's replicas run their own. It also
    loads the names of the DenseNet's modules (``model.features.conv0.weight``)."""

    def __init__(self, model: nn.Module, *args: Any, flatten_sequential: bool = True, **kwargs: Any) -> None:
        super().__init__(model, *args, **kwargs)  # its modules are always flattened, as timm's DenseNet's
        self._modules.pop("model")
        self.__dict__["model"] = model
        for name, module in model.features.named_children():
            self.add_module(_TIMMS_FEATURES + name, module)
        self.register_load_state_dict_pre_hook(_loaded_by_own_names)

    def forward(self, x: Any) -> Any:
        return self._network().forward_intermediates(x, indices=self.out_indices, norm=self.norm,
                                                     output_fmt=self.output_fmt, intermediates_only=True)

    def _network(self) -> DenseNet:
        """The DenseNet on this model's modules: a shallow copy of ``model`` whose ``features`` holds them, made again
        only when they changed (a replacement, a DataParallel replica), so it holds nothing of its own."""
        names = list(self.model.features._modules)
        net = self.__dict__.get("_net")
        if net is None or any(net.features._modules[n] is not self._modules[_TIMMS_FEATURES + n] for n in names):
            net, features = copy.copy(self.model), copy.copy(self.model.features)
            features._modules = {n: self._modules[_TIMMS_FEATURES + n] for n in names}
            net._modules = {**net._modules, "features": features}
            self.__dict__["_net"] = net
        net.training = self.training
        return net

    def set_memory(self, memory: str) -> DenseNetFeatures:
        """The DenseNet's memory mode (:meth:`DenseNet.set_memory`); returns this model."""
        self.model.set_memory(memory)
        self._network().set_memory(memory)
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's switch, as timm's own ``features_only`` models take it (:meth:`DenseNet.set_grad_checkpointing`)."""
        self.set_memory("frugal" if enable else "efficient")


# The module names of timm's features_only DenseNet (its FeatureListNet flattens ``features``), and the DenseNet's own
_TIMMS_FEATURES, _OWN_FEATURES = "features_", "model.features."


def _loaded_by_own_names(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: dict,
                         strict: bool, missing_keys: list[str], unexpected_keys: list[str],
                         error_msgs: list[str]) -> None:
    """Keys by the DenseNet's own module names, renamed to timm's, in place and in order."""
    own, timms = prefix + _OWN_FEATURES, prefix + _TIMMS_FEATURES
    renamed = {key: timms + key[len(own):] for key in state_dict if key.startswith(own)}
    clash = next((key for key, new in renamed.items() if new in state_dict), None)
    if clash is not None:
        error_msgs.append(f"keys {renamed[clash]!r} and {clash!r} (the DenseNet's own name) both name one tensor: a "
                          "state dict has one of the two")
    elif renamed:
        items = list(state_dict.items())
        state_dict.clear()
        state_dict.update((renamed.get(key, key), value) for key, value in items)


def _create(name: str, pretrained: bool, **kwargs: Any) -> DenseNet:
    tag = hf_hub_id = torchvision_file = None
    if pretrained and not _pretrained_file(kwargs) and not (kwargs.get("pretrained_cfg_overlay") or {}).get(
            "state_dict"):
        tag, hf_hub_id, torchvision_file = _torchvision_cached(name, kwargs)
        if torchvision_file is not None and torchvision_file.is_file():
            # torchvision's own download of these weights: read offline, its legacy keys fixed by the filter below
            kwargs["pretrained_cfg_overlay"] = {**(kwargs.get("pretrained_cfg_overlay") or {}),
                                                "file": str(torchvision_file)}
    file = _pretrained_file(kwargs) if pretrained else None
    problem = _pretrained_file_problem(os.fspath(file)) if file else None
    if problem:
        raise ConversionError(problem)
    # timm's meanings: drop_rate is dropout before the classifier, proj_drop_rate after each dense layer.
    if "drop_rate" in kwargs:
        kwargs["head_drop_rate"] = kwargs.pop("drop_rate")
    if "proj_drop_rate" in kwargs:
        kwargs["drop_rate"] = kwargs.pop("proj_drop_rate")
    if "bn_momentum" in kwargs or "bn_eps" in kwargs:
        kwargs["norm_layer"] = _batch_norm_with(kwargs)
    kwargs = {**CONFIGS[name], **kwargs}
    # every feature map by default: the stem, each block but the last, the final norm (timm assumes five)
    out_indices = tuple(range(len(kwargs["block_config"]) + 1))
    output_stride = kwargs.pop("output_stride", None)  # timm's, DeepLab's: dilated before any features are taken
    build = DenseNet if output_stride is None else lambda **a: dilate(DenseNet(**a), output_stride)
    try:
        return build_model_with_cfg(
            build, f"effi_{name}", pretrained,
            # flatten_sequential, as timm's DenseNet: its 'list', 'dict' and 'hook' feature models name modules as ours
            feature_cfg=dict(feature_cls=DenseNetFeatures, out_indices=out_indices, flatten_sequential=True),
            pretrained_filter_fn=timm_pretrained_filter, **kwargs)
    except LocalEntryNotFoundError:  # the hub's own error says neither where else to look nor what to do
        raise not_found_error(name, tag, hf_hub_id, torchvision_file) from None


def _batch_norm_with(kwargs: dict[str, Any]) -> Any:
    """The norm layer for timm's ``bn_momentum`` and ``bn_eps`` (taken out of ``kwargs``), which timm's ``train.py``
    passes for ``--bn-momentum``/``--bn-eps`` and its EfficientNets and MobileNets take: BatchNorm with them."""
    bn = {name: kwargs.pop(f"bn_{name}") for name in ("momentum", "eps") if f"bn_{name}" in kwargs}
    if kwargs.get("norm_layer") is not None:
        raise ValueError(f"bn_momentum and bn_eps are BatchNorm's arguments, beside norm_layer="
                         f"{kwargs['norm_layer']!r}: give that norm its arguments itself (functools.partial)")
    # an unknown spatial_dims is left to the model, which names it
    return functools.partial(BATCH_NORM_ACT.get(kwargs.get("spatial_dims", 2), BatchNormAct2d), **bn)


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.875, "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "features.conv0", "classifier": "classifier", "license": "apache-2.0",
        "paper_ids": "arXiv:1608.06993", **kwargs,
    }


def _tv_cfg(model: str, **kwargs: Any) -> dict[str, Any]:
    # torchvision's weights as timm hosts them (timm/<model>.tv_in1k): same keys as ours, so they load unchanged
    return _cfg(hf_hub_id=f"timm/{model}.tv_in1k", license="bsd-3-clause", origin_url="https://github.com/pytorch/vision",
                **kwargs)


def _timm_cfg(model: str, tag: str, **kwargs: Any) -> dict[str, Any]:
    return _cfg(hf_hub_id=f"timm/{model}.{tag}", origin_url="https://github.com/huggingface/pytorch-image-models",
                **kwargs)


def _cifar_cfg(**kwargs: Any) -> dict[str, Any]:
    return _cfg(num_classes=10, input_size=(3, 32, 32), pool_size=(8, 8), crop_pct=1.0, interpolation="bilinear",
                mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616), license="mit", **kwargs)


# Tags name where weights come from: tv_in1k = torchvision's ImageNet weights, ra_in1k = timm's (densenet121 only).
# tv_in1k comes from torchvision's own cache when torchvision downloaded it (effidense.pretrained); otherwise both are
# fetched from timm's own Hugging Face hub repositories (hf_hub_id), whose state dicts have exactly our keys;
# the preprocessing (input size, crop, interpolation, mean/std, test size) is timm's for the same tag, which
# tests/test_pretrained.py checks. torchvision itself evaluated its weights with bilinear resize 256 / crop 224;
# timm's cfg says bicubic, and so do we. A local file still wins: pretrained_cfg_overlay=dict(file=...).
# The first tag of each model is its default (tv_in1k for densenet121, where timm's own default is ra_in1k).
default_cfgs = generate_default_cfgs({
    "effi_densenet121.tv_in1k": _tv_cfg("densenet121"),
    "effi_densenet121.ra_in1k": _timm_cfg("densenet121", "ra_in1k", test_input_size=(3, 288, 288),
                                          test_crop_pct=0.95),
    "effi_densenet161.tv_in1k": _tv_cfg("densenet161"),
    "effi_densenet169.tv_in1k": _tv_cfg("densenet169"),
    "effi_densenet201.tv_in1k": _tv_cfg("densenet201"),
    "effi_densenet264.untrained": _cfg(license="mit"),
    "effi_densenet40_k12.untrained": _cifar_cfg(),
    "effi_densenet_bc100_k12.untrained": _cifar_cfg(),
    "effi_densenet_bc250_k24.untrained": _cifar_cfg(),
    "effi_densenet_bc190_k40.untrained": _cifar_cfg(),
})


@register_model
def effi_densenet121(pretrained: bool = False, **kwargs: Any) -> DenseNet:
    """DenseNet-121 (k=32), ImageNet."""
    return _create("densenet121", pretrained, **kwargs)


@register_model
def effi_densenet161(pretrained: bool = False, **kwargs: Any) -> DenseNet:
    """DenseNet-161 (k=48), ImageNet."""
    return _create("densenet161", pretrained, **kwargs)


@register_model
def effi_densenet169(pretrained: bool = False, **kwargs: Any) -> DenseNet:
    """DenseNet-169 (k=32), ImageNet."""
    return _create("densenet169", pretrained, **kwargs)


@register_model
def effi_densenet201(pretrained: bool = False, **kwargs: Any) -> DenseNet:
    """DenseNet-201 (k=32), ImageNet."""
    return _create("densenet201", pretrained, **kwargs)


@register_model
def effi_densenet264(pretrained: bool = False, **kwargs: Any) -> DenseNet:
    """DenseNet-264 (k=32), ImageNet."""
    return _create("densenet264", pretrained, **kwargs)


@register_model
def effi_densenet40_k12(pretrained: bool = False, **kwargs: Any) -> DenseNet:
    """DenseNet-40 (k=12, no bottleneck, no compression), CIFAR."""
    return _create("densenet40_k12", pretrained, **kwargs)


@register_model
def effi_densenet_bc100_k12(pretrained: bool = False, **kwargs: Any) -> DenseNet:
    """DenseNet-BC-100 (k=12), CIFAR."""
    return _create("densenet_bc100_k12", pretrained, **kwargs)


@register_model
def effi_densenet_bc250_k24(pretrained: bool = False, **kwargs: Any) -> DenseNet:
    """DenseNet-BC-250 (k=24), CIFAR."""
    return _create("densenet_bc250_k24", pretrained, **kwargs)


@register_model
def effi_densenet_bc190_k40(pretrained: bool = False, **kwargs: Any) -> DenseNet:
    """DenseNet-BC-190 (k=40), CIFAR."""
    return _create("densenet_bc190_k40", pretrained, **kwargs)
