"""The variants a benchmark compares: our memory modes, torchvision's and timm's DenseNets, compiled copies."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torchvision
from timm.models.densenet import DenseNet as TimmDenseNet
from torch import nn

from ..densenet import MEMORY_MODES
from ..modelspec import ModelSpec
from ..weights import layout_state_dict

__all__ = ["PEERS", "COMPILE_SUFFIX", "HOST_REFERENCE", "HOST_BATCH", "parse_variants", "peer_unsupported",
           "build_variant", "compile_model", "host_img_size", "input_shape", "load_weights", "size_label"]


# The one peers table: every tool (bench, gpu-report) names the peers so. tv-plain, keeping everything, is the
# reference for host overhead (the framework's own cost of a step, before any arithmetic).
PEERS = {
    "tv": "torchvision memory_efficient=True",
    "timm": "timm set_grad_checkpointing()",
    "tv-plain": "torchvision plain",
    "monai": "MONAI DenseNet (keeps everything; 1-3 spatial dims)",
}
HOST_REFERENCE = "tv-plain"
HOST_BATCH = 2  # images per host-overhead step: BatchNorm needs two values per channel
COMPILE_SUFFIX = "+compile"


def parse_variants(text: str | Sequence[str], compile_all: bool = False) -> list[str]:
    """Variant names from ``"plain,efficient,tv"``; ``compile_all`` appends ``+compile`` copies of our modes."""
    names = [v.strip() for v in (text.split(",") if isinstance(text, str) else text) if v.strip()]
    known = (*MEMORY_MODES, *PEERS)
    for name in names:
        if name.removesuffix(COMPILE_SUFFIX) not in known:
            raise ValueError(f"unknown variant {name!r}; choose from {', '.join(known)}, each optionally with "
                             f"{COMPILE_SUFFIX!r}")
    if not names:
        raise ValueError("no variants given")
    if compile_all:
        names += [n + COMPILE_SUFFIX for n in names if n in MEMORY_MODES]
    return list(dict.fromkeys(names))  # drop repeats, keep order


def input_shape(spec: ModelSpec, batch_size: int, img_size: int) -> tuple[int, ...]:
    """(N, C, *spatial) of a batch for ``spec``: an image, a volume or a signal of side ``img_size``."""
    return (batch_size, spec.arg("in_chans"), *(img_size,) * spec.arg("spatial_dims"))


def size_label(spec: ModelSpec, img_size: int) -> str:
    """``224x224``, ``96x96x96``: the input's spatial size."""
    return "x".join([str(img_size)] * spec.arg("spatial_dims"))


def peer_unsupported(spec: ModelSpec, peer: str) -> str | None:
    """Why ``peer`` has no exact counterpart of ``spec`` (None when it has one)."""
    reasons = []
    if peer != "monai" and spec.arg("spatial_dims") != 2:
        reasons.append("it is 2D only")
    if spec.arg("small_inputs"):
        reasons.append("it has no small-input (CIFAR) stem")
    if not spec.bottleneck:
        reasons.append("its dense layers always have a bottleneck")
    if spec.arg("compression") != 0.5:
        reasons.append("its transitions always keep half the channels")
    if peer in ("tv", "tv-plain"):
        if spec.arg("in_chans") != 3:
            reasons.append("it takes 3 input channels only")
        if spec.arg("global_pool") != "avg":
            reasons.append("it pools by average only")
        if spec.arg("head_drop_rate"):
            reasons.append("it has no head dropout")
    elif peer == "timm" and spec.arg("num_init_features") != 2 * spec.arg("growth_rate"):
        reasons.append("its stem width is always 2 * growth_rate")
    elif peer == "monai":
        if spec.arg("global_pool") != "avg":
            reasons.append("it pools by average only")
        if spec.arg("head_drop_rate"):
            reasons.append("it has no head dropout")
    name = {"timm": "timm", "monai": "MONAI"}.get(peer, "torchvision")
    return f"{name} cannot build {spec.name}: {'; '.join(reasons)}" if reasons else None


def build_variant(variant: str, spec: ModelSpec) -> nn.Module:
    """An uncompiled model for ``variant`` (without ``+compile``) with fresh weights."""
    if variant in MEMORY_MODES:
        return spec.build(variant)
    reason = peer_unsupported(spec, variant)
    if reason:
        raise ValueError(reason)
    if variant in ("tv", "tv-plain"):
        return torchvision.models.DenseNet(
            growth_rate=spec.arg("growth_rate"), block_config=spec.block_config,
            num_init_features=spec.arg("num_init_features"), bn_size=spec.arg("bn_size"),
            drop_rate=spec.arg("drop_rate"), num_classes=spec.arg("num_classes"), memory_efficient=variant == "tv")
    if variant == "timm":
        model = TimmDenseNet(
            growth_rate=spec.arg("growth_rate"), block_config=spec.block_config, num_classes=spec.arg("num_classes"),
            in_chans=spec.arg("in_chans"), global_pool=spec.arg("global_pool"), bn_size=spec.arg("bn_size"),
            drop_rate=spec.arg("head_drop_rate"), proj_drop_rate=spec.arg("drop_rate"))
        model.set_grad_checkpointing(True)
        return model
    if variant == "monai":
        try:
            from monai.networks.nets import DenseNet as MonaiDenseNet
        except ImportError:
            raise ValueError("the 'monai' variant needs MONAI: pip install monai") from None
        return MonaiDenseNet(
            spatial_dims=spec.arg("spatial_dims"), in_channels=spec.arg("in_chans"),
            out_channels=spec.arg("num_classes"), init_features=spec.arg("num_init_features"),
            growth_rate=spec.arg("growth_rate"), block_config=spec.block_config, bn_size=spec.arg("bn_size"),
            dropout_prob=spec.arg("drop_rate"))
    raise ValueError(f"unknown variant {variant!r}")


def load_weights(model: nn.Module, variant: str, state: dict[str, torch.Tensor]) -> None:
    """Load effidense's (torchvision's) state dict into ``variant``'s model: MONAI's names its keys otherwise."""
    model.load_state_dict(layout_state_dict(state, "monai") if variant == "monai" else state)


def compile_model(model: nn.Module, scope: str = "layers", **options: Any) -> nn.Module:
    """Compiled ``model``: its own ``set_compile(scope=...)`` when it has one, else ``torch.compile`` of the whole;
    ``options`` go to torch.compile."""
    if hasattr(model, "set_compile"):
        return model.set_compile(True, scope=scope, **options)
    return torch.compile(model, **options)


def host_img_size(spec: ModelSpec) -> int:
    """Image size of the host-overhead step: 32, or the model's ``min_input_size`` if larger."""
    with torch.device("meta"):  # building on the meta device costs no memory
        return max(32, spec.build("plain").min_input_size)
