"""DeepLab's dilated DenseNet: ``output_stride``, as timm's dilated backbones take it.

A DenseNet's blocks run at strides 4, 8, 16, 32 of the input (1, 2, 4, ... with ``small_inputs``). For a smaller
``output_stride``, each transition that would pool below it keeps its input's size, and the blocks after it dilate
their 3x3 convolutions instead (DenseASPP's DenseNet-121 at stride 8: the last two transitions unpooled, the last
two blocks dilated 2 and 4), so the last map has ``1/output_stride`` of the input's size along each axis with the
same weights and receptive fields. segmentation_models_pytorch's DeepLabV3, DeepLabV3+ and PAN ask timm for it
(``output_stride=8`` or ``16``). Every memory mode computes the same function as plain, as on the undilated network.
"""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .densenet import DenseLayer, DenseNet
from .layers import AvgPool

__all__ = ["Unpooled", "dilate", "strides"]


class Unpooled(nn.Module):
    """A transition's pool, taken out: its output is its input. Like the pool it replaces it keeps nothing, and in a
    sliced segment gives its input's gradient, its output's (:meth:`input_grad`)."""

    def __init__(self, spatial_dims: int = 2) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims

    def extra_repr(self) -> str:
        return f"spatial_dims={self.spatial_dims}"

    def forward(self, x: Tensor) -> Tensor:
        return x

    def input_grad(self, like: Tensor, grad: Tensor) -> Tensor:
        """The gradient with respect to the input, laid out as ``like`` (shape and strides only), given the output's:
        the same values."""
        return grad if grad.stride() == like.stride() else like.copy_(grad)


def strides(small_inputs: bool, blocks: int) -> list[int]:
    """The strides the dense blocks of a DenseNet (``small_inputs``, ``blocks`` of them) run at, undilated: the output
    strides it can be given."""
    first = 1 if small_inputs else 4
    return [first * 2 ** i for i in range(blocks)]


def dilate(model: DenseNet, output_stride: int) -> DenseNet:
    """``model`` with its last map at ``output_stride`` (one of :func:`strides`; the last is the network's own): the
    transitions that would pool below it unpooled (:class:`Unpooled`), the 3x3 convolutions of each block after them
    dilated by the stride it would have run at over ``output_stride``, and ``feature_info``'s reductions those the maps
    now have. Changes ``model`` in place (a model dilated before is set to the new stride) and returns it; its weights
    stay as they are."""
    allowed = strides(model.small_inputs, len(model.block_config))
    if isinstance(output_stride, bool) or output_stride not in allowed:
        raise ValueError(f"output_stride must be one of {', '.join(map(str, allowed))} for this DenseNet (the "
                         f"strides its blocks run at), got {output_stride!r}")
    features = model.features
    for i, stride in enumerate(allowed[1:], 2):
        transition = features.get_submodule(f"transition{i - 1}")
        transition.pool = Unpooled(model.spatial_dims) if stride > output_stride else AvgPool(model.spatial_dims)
        dilation = (max(stride // output_stride, 1),) * model.spatial_dims
        for layer in features.get_submodule(f"denseblock{i}").values():
            _dilate_conv(layer, dilation)
    for info, stride in zip(model.feature_info[1:], allowed, strict=False):
        info["reduction"] = min(stride, output_stride)
    return model


def _dilate_conv(layer: DenseLayer, dilation: tuple[int, ...]) -> None:
    conv: Any = layer.conv2 if layer.bottleneck else layer.conv1  # the 3x3 one
    conv.dilation, conv.padding = dilation, dilation
