"""effidense's DenseNets as backbones of MONAI's FlexibleUNet, in 2D and 3D.

``import effidense.flexunet`` registers ``effi-densenet121``, ``effi-densenet169``, ``effi-densenet201`` and
``effi-densenet264`` with MONAI's ``FLEXUNET_BACKBONE``, as MONAI registers its EfficientNets and ResNets:

    from monai.networks.nets import FlexibleUNet
    import effidense.flexunet  # noqa: F401

    model = FlexibleUNet(in_channels=1, out_channels=2, backbone="effi-densenet121", spatial_dims=3, pretrained=True)
    model.encoder.set_memory("frugal")  # 'efficient' (the default), 'frugal' or 'plain'

The encoder (:class:`DenseNetEncoder`) is :class:`effidense.DenseNet` without its head, which hands the decoder its
five maps at strides 2, 4, 8, 16 and 32 (the stem's, each block's before its transition, the final norm's), in every
memory mode, as MONAI's encoders do. ``pretrained=True`` starts it from torchvision's ImageNet weights, in 2D and 3D
(inflated by I3D's mean) and for any ``in_channels``, where MONAI's own ImageNet weights are 2D only. Needs MONAI.
"""
from __future__ import annotations

from typing import Any

import torch
from monai.networks.blocks.encoder import BaseEncoder
from monai.networks.nets.flexible_unet import FLEXUNET_BACKBONE
from torch import Tensor

from .configs import CONFIGS
from .densenet import DenseNet
from .monai import imagenet_weights

__all__ = ["DenseNetEncoder"]

_NAMES = ("densenet121", "densenet169", "densenet201", "densenet264")
_PRETRAINED = ("densenet121", "densenet169", "densenet201")  # torchvision's ImageNet weights


class DenseNetEncoder(DenseNet, BaseEncoder):
    """:class:`effidense.DenseNet` ``model_name`` (``densenet121``, ...) without its head, as a FlexibleUNet
    encoder: ``forward`` gives its five feature maps (``forward_intermediates``); ``memory`` as the model's."""

    def __init__(self, model_name: str, spatial_dims: int = 2, in_channels: int = 3, pretrained: bool = False,
                 memory: str = "efficient", progress: bool = True) -> None:
        if pretrained and model_name not in _PRETRAINED:
            raise ValueError(f"pretrained=True: there are no ImageNet weights for {model_name}; "
                             f"{', '.join(_PRETRAINED)} have them")
        super().__init__(**CONFIGS[model_name], num_classes=0, global_pool="", in_chans=in_channels,
                         spatial_dims=spatial_dims, memory=memory)
        if pretrained:
            self.load_state_dict(imagenet_weights(model_name, spatial_dims, in_channels, "effidense", progress,
                                                  into="model.encoder"), strict=True)

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.forward_intermediates(x, intermediates_only=True)

    @classmethod
    def get_encoder_names(cls) -> list[str]:
        return [f"effi-{name}" for name in _NAMES]

    @classmethod
    def get_encoder_parameters(cls) -> list[dict[str, Any]]:
        return [{"model_name": name, "spatial_dims": 2, "in_channels": 3, "pretrained": False} for name in _NAMES]

    @classmethod
    def num_channels_per_output(cls) -> list[tuple[int, ...]]:
        with torch.device("meta"):  # shapes only
            return [tuple(info["num_chs"] for info in DenseNet(**CONFIGS[name], num_classes=0).feature_info)
                    for name in _NAMES]

    @classmethod
    def num_outputs(cls) -> list[int]:
        return [len(CONFIGS[name]["block_config"]) + 1 for name in _NAMES]


FLEXUNET_BACKBONE.register_class(DenseNetEncoder)
