"""The variants a benchmark compares: our memory modes, torchvision's and timm's DenseNets, compiled copies."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..densenet import MEMORY_MODES
from ..modelspec import ModelSpec
from ..peers import build_peer, peer_limits
from ..weights import layout_state_dict

__all__ = ["PEERS", "COMPILE_SUFFIX", "HOST_REFERENCE", "HOST_BATCH", "parse_variants", "peer_unsupported",
           "build_variant", "compile_model", "host_img_size", "input_shape", "load_weights", "size_label",
           "PEER_LIBRARY"]


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
    """Variant names from ``"plain,efficient,tv"``; ``compile_all`` appends ``+compile`` copies of our modes. A
    compiled variant brings its eager self, so that every run can say whether compiling pays."""
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
    names = [m for n in names for m in ((n.removesuffix(COMPILE_SUFFIX), n) if n.endswith(COMPILE_SUFFIX) else (n,))]
    return list(dict.fromkeys(names))  # drop repeats, keep order


def input_shape(spec: ModelSpec, batch_size: int, img_size: int) -> tuple[int, ...]:
    """(N, C, *spatial) of a batch for ``spec``: an image, a volume or a signal of side ``img_size``."""
    return (batch_size, spec.arg("in_chans"), *(img_size,) * spec.arg("spatial_dims"))


def size_label(spec: ModelSpec, img_size: int) -> str:
    """``224x224``, ``96x96x96``: the input's spatial size."""
    return "x".join([str(img_size)] * spec.arg("spatial_dims"))


# the library each peer builds with
PEER_LIBRARY = {"tv": "torchvision", "tv-plain": "torchvision", "timm": "timm", "monai": "monai"}


def peer_unsupported(spec: ModelSpec, peer: str) -> str | None:
    """Why ``peer`` has no exact counterpart of ``spec`` (None when it has one; see
    :func:`effidense.peers.peer_limits`)."""
    reasons = peer_limits(PEER_LIBRARY[peer], spec)
    return f"{PEER_LIBRARY[peer]} cannot build {spec.name}: {'; '.join(reasons)}" if reasons else None


def build_variant(variant: str, spec: ModelSpec) -> nn.Module:
    """An uncompiled model for ``variant`` (without ``+compile``) with fresh weights."""
    if variant in MEMORY_MODES:
        return spec.build(variant)
    if variant not in PEER_LIBRARY:
        raise ValueError(f"unknown variant {variant!r}")
    return build_peer(PEER_LIBRARY[variant], spec, memory_efficient=variant == "tv",
                      grad_checkpointing=variant == "timm")


def load_weights(model: nn.Module, variant: str, state: dict[str, torch.Tensor]) -> None:
    """Load effidense's (torchvision's) state dict into ``variant``'s model: MONAI's names its keys otherwise."""
    model.load_state_dict(layout_state_dict(state, "monai") if variant == "monai" else state)


def compile_model(model: nn.Module, **options: Any) -> nn.Module:
    """``model`` compiled whole: its own ``set_compile`` (in place) when it has one, else ``torch.compile``;
    ``options`` go to torch.compile."""
    if hasattr(model, "set_compile"):
        return model.set_compile(True, **options)
    return torch.compile(model, **options)


def host_img_size(spec: ModelSpec) -> int:
    """Image size of the host-overhead step: 32, or the model's ``min_input_size`` if larger."""
    with torch.device("meta"):  # building on the meta device costs no memory
        return max(32, spec.build("plain").min_input_size)
