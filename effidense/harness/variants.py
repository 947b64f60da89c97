"""The variants the tools compare: our memory modes, the peers (torchvision's, timm's and MONAI's DenseNets),
compiled copies.

This is the one place that builds a peer library's DenseNet from a DenseNet description, and says why a peer cannot
hold one: ``effidense convert`` builds the peers to verify conversions, bench, plan and gpu-report to compare
against them. The peer libraries are imported only when a model is built.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..choices import COMPILE_SUFFIX, MEMORY_MODES, MONAI_MODELS, PEERS
from ..dilation import strides
from ..modelspec import ModelSpec
from ..weights import layout_state_dict

__all__ = ["PEERS", "COMPILE_SUFFIX", "PEER_LIBRARY", "PEER_LIBRARIES", "parse_variants", "peer_limits",
           "peer_unsupported", "build_peer", "build_variant", "compile_model", "load_weights", "monai_variants"]




def parse_variants(text: str | Sequence[str], compile_all: bool = False, offered: Sequence[str] = ()) -> list[str]:
    """Variant names from ``"plain,efficient,tv"``; ``compile_all`` appends ``+compile`` copies of our modes. A
    compiled variant brings its eager self, so that every run can say whether compiling pays. ``offered``: names a
    model's own builders know besides our modes and the peers (an FC-DenseNet's ``reference``)."""
    names = [v.strip() for v in (text.split(",") if isinstance(text, str) else text) if v.strip()]
    known = tuple(dict.fromkeys((*MEMORY_MODES, *PEERS, *offered)))
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


# the library each peer builds with
PEER_LIBRARY = {"tv": "torchvision", "tv-plain": "torchvision", "timm": "timm", "monai": "monai"}
PEER_LIBRARIES = ("torchvision", "timm", "monai")


def peer_limits(library: str, spec: ModelSpec) -> list[str]:
    """Why ``library``'s DenseNet class cannot build ``spec`` exactly (empty when it can)."""
    if library not in PEER_LIBRARIES:
        raise ValueError(f"unknown peer library {library!r}; choose one of: {', '.join(PEER_LIBRARIES)}")
    reasons = []  # MONAI's DenseNet takes any in_channels, init_features, growth_rate and spatial_dims
    if spec.arg("small_inputs"):
        reasons.append("it has no small-input (CIFAR) stem (small_inputs=True)")
    if not spec.bottleneck:
        reasons.append("its dense layers always have a bottleneck (bn_size=None)")
    stride = spec.arg("output_stride")
    if stride is not None and stride != strides(spec.arg("small_inputs"), len(spec.block_config))[-1]:
        reasons.append(f"it takes no output_stride (output_stride={stride})")
    if spec.arg("compression") != 0.5:
        reasons.append(f"its transitions always halve the channels (compression={spec.arg('compression'):g})")
    if library != "monai" and spec.arg("spatial_dims") != 2:
        reasons.append(f"it is 2D only (spatial_dims={spec.arg('spatial_dims')})")
    if library == "torchvision" and spec.arg("in_chans") != 3:
        reasons.append(f"it always takes 3 input channels (in_chans={spec.arg('in_chans')})")
    if library != "timm" and spec.arg("global_pool") != "avg":
        reasons.append(f"it pools by average only (global_pool={spec.arg('global_pool')})")
    if library != "timm" and spec.arg("head_drop_rate"):
        reasons.append(f"it has no head dropout (head_drop_rate={spec.arg('head_drop_rate'):g})")
    if library == "timm" and spec.arg("num_init_features") != 2 * spec.arg("growth_rate"):
        reasons.append(f"its stem width is always 2 * growth_rate (num_init_features={spec.arg('num_init_features')},"
                       f" growth_rate={spec.arg('growth_rate')})")
    return reasons


def build_peer(library: str, spec: ModelSpec, memory_efficient: bool = False,
               grad_checkpointing: bool = False) -> nn.Module:
    """A randomly initialised DenseNet of ``library``'s own class for ``spec`` (ValueError when it has none, see
    :func:`peer_limits`). ``memory_efficient`` is torchvision's checkpointing, ``grad_checkpointing`` timm's. A
    model without classes (``num_classes=0``) ends at the pooled features in every library."""
    reasons = peer_limits(library, spec)
    if reasons:
        raise ValueError(f"{library} cannot build {spec.name}: " + "; ".join(reasons))
    num_classes = spec.arg("num_classes")
    if library == "timm":
        from timm.models.densenet import DenseNet as TimmDenseNet

        model = TimmDenseNet(growth_rate=spec.arg("growth_rate"), block_config=spec.block_config,
                             num_classes=num_classes, in_chans=spec.arg("in_chans"),
                             global_pool=spec.arg("global_pool"), bn_size=spec.arg("bn_size"),
                             drop_rate=spec.arg("head_drop_rate"), proj_drop_rate=spec.arg("drop_rate"))
        if grad_checkpointing:
            model.set_grad_checkpointing(True)
        return model
    if library == "monai":
        try:
            from monai.networks.nets import DenseNet as MonaiDenseNet
        except ImportError:
            raise ValueError("building MONAI's DenseNet needs MONAI (pip install monai)") from None
        model = MonaiDenseNet(spatial_dims=spec.arg("spatial_dims"), in_channels=spec.arg("in_chans"),
                              out_channels=max(num_classes, 1), init_features=spec.arg("num_init_features"),
                              growth_rate=spec.arg("growth_rate"), block_config=spec.block_config,
                              bn_size=spec.arg("bn_size"), dropout_prob=spec.arg("drop_rate"))
        if num_classes == 0:
            model.class_layers.out = nn.Identity()
        return model
    from torchvision.models import DenseNet as TorchvisionDenseNet

    model = TorchvisionDenseNet(growth_rate=spec.arg("growth_rate"), block_config=spec.block_config,
                                num_init_features=spec.arg("num_init_features"), bn_size=spec.arg("bn_size"),
                                drop_rate=spec.arg("drop_rate"), num_classes=max(num_classes, 1),
                                memory_efficient=memory_efficient)
    if num_classes == 0:  # torchvision always has a classifier
        model.classifier = nn.Identity()
    return model


def peer_unsupported(spec: ModelSpec, peer: str) -> str | None:
    """Why ``peer`` has no exact counterpart of ``spec`` (None when it has one; see
    :func:`peer_limits`)."""
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


def monai_variants(name: str, spatial_dims: int, in_channels: int, out_channels: int,
                   **kwargs: Any) -> tuple[dict[str, Callable[[], nn.Module]], int]:
    """What the planner compares for MONAI's ``name`` (``DenseNet121``): :mod:`effidense.monai`'s drop-in in each
    memory mode, exactly as a user builds it with ``kwargs`` (MONAI's names), and MONAI's own class as the ``monai``
    peer where MONAI is installed; and the smallest input edge the model takes."""
    from .. import monai as drop_in

    if name not in MONAI_MODELS:
        raise ValueError(f"unknown MONAI DenseNet {name!r}; choose one of {', '.join(MONAI_MODELS)}")
    model = functools.partial(getattr(drop_in, name), spatial_dims, in_channels, out_channels, **kwargs)
    with torch.device("meta"):  # checks the arguments at no cost, and gives the smallest input
        min_size = model().min_input_size
    builders: dict[str, Callable[[], nn.Module]] = {mode: functools.partial(model, memory=mode)
                                                     for mode in MEMORY_MODES}
    try:
        from monai.networks import nets
    except ImportError:
        return builders, min_size
    builders["monai"] = functools.partial(getattr(nets, name), spatial_dims, in_channels, out_channels, **kwargs)
    return builders, min_size


def load_weights(model: nn.Module, variant: str, state: dict[str, torch.Tensor]) -> None:
    """Load effidense's (torchvision's) state dict into ``variant``'s model: MONAI's names its keys otherwise."""
    model.load_state_dict(layout_state_dict(state, "monai") if variant == "monai" else state)


def compile_model(model: nn.Module, **options: Any) -> nn.Module:
    """``model`` compiled whole: its own ``set_compile`` (in place) when it has one, else ``torch.compile``;
    ``options`` go to torch.compile."""
    if hasattr(model, "set_compile"):
        return model.set_compile(True, **options)
    return torch.compile(model, **options)
