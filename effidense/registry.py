"""Named DenseNet configurations, their builders and the timm registry.

``import effidense`` registers the ``effi_*`` models, so ``timm.create_model('effi_densenet121')`` works; builders
such as :func:`densenet121` build the same networks without timm's machinery.
"""
from __future__ import annotations

from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from .densenet import DenseNet
from .weights import timm_pretrained_filter

__all__ = ["CONFIGS", "densenet121", "densenet161", "densenet169", "densenet201", "densenet264",
           "densenet40_k12", "densenet_bc100_k12", "densenet_bc250_k24", "densenet_bc190_k40"]


# name: (growth_rate, block_config, num_init_features, bn_size, compression, small_inputs, default num_classes)
CONFIGS: dict[str, dict[str, Any]] = {
    "densenet121": dict(growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64),
    "densenet161": dict(growth_rate=48, block_config=(6, 12, 36, 24), num_init_features=96),
    "densenet169": dict(growth_rate=32, block_config=(6, 12, 32, 32), num_init_features=64),
    "densenet201": dict(growth_rate=32, block_config=(6, 12, 48, 32), num_init_features=64),
    "densenet264": dict(growth_rate=32, block_config=(6, 12, 64, 48), num_init_features=64),
    # CIFAR nets (Huang et al., Table 2): 3 blocks, 3x3 stem, 10 classes by default.
    "densenet40_k12": dict(growth_rate=12, block_config=(12, 12, 12), num_init_features=16, bn_size=None,
                           compression=1.0, small_inputs=True, num_classes=10),
    "densenet_bc100_k12": dict(growth_rate=12, block_config=(16, 16, 16), num_init_features=24,
                               small_inputs=True, num_classes=10),
    "densenet_bc250_k24": dict(growth_rate=24, block_config=(41, 41, 41), num_init_features=48,
                               small_inputs=True, num_classes=10),
    "densenet_bc190_k40": dict(growth_rate=40, block_config=(31, 31, 31), num_init_features=80,
                               small_inputs=True, num_classes=10),
}


def _build(name: str, **kwargs: Any) -> DenseNet:
    return DenseNet(**{**CONFIGS[name], **kwargs})


def densenet121(**kwargs: Any) -> DenseNet:
    """DenseNet-121 (k=32), ImageNet."""
    return _build("densenet121", **kwargs)


def densenet161(**kwargs: Any) -> DenseNet:
    """DenseNet-161 (k=48), ImageNet."""
    return _build("densenet161", **kwargs)


def densenet169(**kwargs: Any) -> DenseNet:
    """DenseNet-169 (k=32), ImageNet."""
    return _build("densenet169", **kwargs)


def densenet201(**kwargs: Any) -> DenseNet:
    """DenseNet-201 (k=32), ImageNet."""
    return _build("densenet201", **kwargs)


def densenet264(**kwargs: Any) -> DenseNet:
    """DenseNet-264 (k=32), ImageNet."""
    return _build("densenet264", **kwargs)


def densenet40_k12(**kwargs: Any) -> DenseNet:
    """DenseNet-40 (k=12, no bottleneck, no compression), CIFAR."""
    return _build("densenet40_k12", **kwargs)


def densenet_bc100_k12(**kwargs: Any) -> DenseNet:
    """DenseNet-BC-100 (k=12), CIFAR."""
    return _build("densenet_bc100_k12", **kwargs)


def densenet_bc250_k24(**kwargs: Any) -> DenseNet:
    """DenseNet-BC-250 (k=24), CIFAR."""
    return _build("densenet_bc250_k24", **kwargs)


def densenet_bc190_k40(**kwargs: Any) -> DenseNet:
    """DenseNet-BC-190 (k=40), CIFAR."""
    return _build("densenet_bc190_k40", **kwargs)


# --- timm registry: `import effidense` makes timm.create_model('effi_densenet121') work ---

def _create(name: str, pretrained: bool, **kwargs: Any) -> DenseNet:
    # timm's meanings: drop_rate is dropout before the classifier, proj_drop_rate after each dense layer.
    if "drop_rate" in kwargs:
        kwargs["head_drop_rate"] = kwargs.pop("drop_rate")
    if "proj_drop_rate" in kwargs:
        kwargs["drop_rate"] = kwargs.pop("proj_drop_rate")
    kwargs = {**CONFIGS[name], **kwargs}
    # every feature map by default: the stem, each block but the last, the final norm (timm assumes five)
    out_indices = tuple(range(len(kwargs["block_config"]) + 1))
    return build_model_with_cfg(
        DenseNet, f"effi_{name}", pretrained, feature_cfg=dict(feature_cls="getter", out_indices=out_indices),
        pretrained_filter_fn=timm_pretrained_filter, **kwargs)


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
# Both are fetched from timm's own Hugging Face hub repositories (hf_hub_id), whose state dicts have exactly our keys;
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
