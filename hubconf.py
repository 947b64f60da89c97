"""torch.hub entry points: ``torch.hub.load("<owner>/effidense", "densenet121", pretrained=True)``, or
``torch.hub.load(repo_dir, "densenet121", source="local", weights="DEFAULT")`` from a checkout.

Each entry point builds the timm model ``effi_<name>`` (so it carries timm's ``pretrained_cfg`` for preprocessing);
weights come from timm's Hugging Face hub repositories, as with ``timm.create_model("effi_<name>.<tag>",
pretrained=True)``. Other keyword arguments go to the model (``num_classes``, ``in_chans``, ``memory``, ...).
"""
from __future__ import annotations

from typing import Any as _Any

dependencies = ["torch", "timm", "safetensors", "huggingface_hub"]

# torchvision's weight names (DenseNet121_Weights.IMAGENET1K_V1) are torchvision's weights: our tv_in1k tag
_TORCHVISION_WEIGHTS = {"IMAGENET1K_V1": "tv_in1k"}


def _tag(name: str, pretrained: bool, weights: _Any) -> str | None:
    """The timm tag that ``pretrained``/``weights`` ask for, or None for random initialisation.

    ``weights`` may be a tag (``"tv_in1k"``, ``"ra_in1k"``), ``"DEFAULT"``, or torchvision's spelling
    (``"IMAGENET1K_V1"``, ``"DenseNet121_Weights.IMAGENET1K_V1"`` or the enum member itself).
    """
    import timm

    import effidense  # noqa: F401 (registers the effi_* models)

    model = f"effi_{name}"
    tags = [t.split(".", 1)[1] for t in timm.list_pretrained(model)]
    default = timm.models.get_pretrained_cfg(model).tag if tags else None
    if weights is None:
        if not pretrained:
            return None
        if default is None:
            raise ValueError(f"{name}: no pretrained weights exist (untrained model)")
        return default
    text = getattr(weights, "name", None) or str(weights)  # a torchvision enum member has .name
    text = text.rsplit(".", 1)[-1]  # "DenseNet121_Weights.IMAGENET1K_V1" -> "IMAGENET1K_V1"
    tag = default if text == "DEFAULT" else _TORCHVISION_WEIGHTS.get(text, text)
    if tag not in tags:
        choices = ", ".join(tags + ["DEFAULT", *_TORCHVISION_WEIGHTS]) if tags else "none (untrained model)"
        raise ValueError(f"{name}: unknown weights {weights!r}; choose one of: {choices}")
    return tag


def _create(name: str, pretrained: bool, weights: _Any, kwargs: dict[str, _Any]) -> _Any:
    import timm

    import effidense  # noqa: F401

    tag = _tag(name, pretrained, weights)
    if tag is None:
        return timm.create_model(f"effi_{name}", **kwargs)
    return timm.create_model(f"effi_{name}.{tag}", pretrained=True, **kwargs)


def densenet121(pretrained: bool = False, weights: _Any = None, **kwargs: _Any) -> _Any:
    """DenseNet-121 (k=32), ImageNet. Weights: tv_in1k (default; torchvision's, = IMAGENET1K_V1), ra_in1k (timm's)."""
    return _create("densenet121", pretrained, weights, kwargs)


def densenet161(pretrained: bool = False, weights: _Any = None, **kwargs: _Any) -> _Any:
    """DenseNet-161 (k=48), ImageNet. Weights: tv_in1k (torchvision's, = IMAGENET1K_V1)."""
    return _create("densenet161", pretrained, weights, kwargs)


def densenet169(pretrained: bool = False, weights: _Any = None, **kwargs: _Any) -> _Any:
    """DenseNet-169 (k=32), ImageNet. Weights: tv_in1k (torchvision's, = IMAGENET1K_V1)."""
    return _create("densenet169", pretrained, weights, kwargs)


def densenet201(pretrained: bool = False, weights: _Any = None, **kwargs: _Any) -> _Any:
    """DenseNet-201 (k=32), ImageNet. Weights: tv_in1k (torchvision's, = IMAGENET1K_V1)."""
    return _create("densenet201", pretrained, weights, kwargs)


def densenet264(pretrained: bool = False, weights: _Any = None, **kwargs: _Any) -> _Any:
    """DenseNet-264 (k=32), ImageNet. No pretrained weights."""
    return _create("densenet264", pretrained, weights, kwargs)


def densenet40_k12(pretrained: bool = False, weights: _Any = None, **kwargs: _Any) -> _Any:
    """DenseNet-40 (k=12, no bottleneck, no compression), CIFAR. No pretrained weights."""
    return _create("densenet40_k12", pretrained, weights, kwargs)


def densenet_bc100_k12(pretrained: bool = False, weights: _Any = None, **kwargs: _Any) -> _Any:
    """DenseNet-BC-100 (k=12), CIFAR. No pretrained weights."""
    return _create("densenet_bc100_k12", pretrained, weights, kwargs)


def densenet_bc250_k24(pretrained: bool = False, weights: _Any = None, **kwargs: _Any) -> _Any:
    """DenseNet-BC-250 (k=24), CIFAR. No pretrained weights."""
    return _create("densenet_bc250_k24", pretrained, weights, kwargs)


def densenet_bc190_k40(pretrained: bool = False, weights: _Any = None, **kwargs: _Any) -> _Any:
    """DenseNet-BC-190 (k=40), CIFAR. No pretrained weights."""
    return _create("densenet_bc190_k40", pretrained, weights, kwargs)
