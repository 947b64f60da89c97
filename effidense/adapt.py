"""Weights for another shape of the same network: 2D kernels inflated to 3D, the stem's convolution for other input
channels, a fresh classifier for other classes. What an ImageNet start for a volume needs
(:class:`effidense.monai.DenseNet121` with ``pretrained=True``, ``effidense convert --inflate --in-chans
--num-classes``, :func:`effidense.convert.inflate`); every other weight is copied unchanged.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from .weights import ConversionError, canonical_key, has_layout_keys, layout_key

__all__ = ["adapt_input_channels", "adapt_state_dict", "fresh_classifier", "inflate_kernels"]

FIRST_CONV = "features.conv0.weight"
CLASSIFIER = ("classifier.weight", "classifier.bias")


def inflate_kernels(state_dict: Mapping[str, Tensor], method: str) -> dict[str, Tensor]:
    """``state_dict`` with every 2D kernel made 3D by ``method`` (see :func:`effidense.convert.inflate`), the rest
    copied."""
    out = {}
    for key, value in state_dict.items():
        if value.dim() != 4:
            out[key] = value.clone()
            continue
        k, kw = value.shape[-2:]
        if k != kw:
            raise ConversionError(f"cannot inflate {key} {list(value.shape)}: its kernel is not square")
        if method == "mean":
            out[key] = value.unsqueeze(2).repeat(1, 1, k, 1, 1).div(k)
        else:
            if k % 2 == 0:
                raise ConversionError(f"cannot centre {key} {list(value.shape)}: an even kernel has no middle tap")
            out[key] = value.new_zeros(value.shape[:2] + (k,) + value.shape[2:])
            out[key][:, :, k // 2] = value
    return out


def adapt_input_channels(weight: Tensor, in_chans: int) -> Tensor:
    """The first convolution's ``weight`` (RGB) for ``in_chans`` input channels: unchanged for 3; otherwise each
    channel gets the sum over RGB divided by ``in_chans``.

    Summing is what a grey image asks for: an RGB network shown a grey image sees the same value in all three
    channels, so its first convolution computes (sum over RGB of the kernels) * image. One channel with the summed
    kernel computes exactly that, so the ImageNet BatchNorm statistics after the stem still fit the activations
    (averaging would shrink them threefold, and eval-mode outputs with them). With several channels (say two MRI
    sequences) the sum is shared out evenly, so the same image in every channel again gives the grey image's
    activations. timm's ``adapt_input_conv`` does the same for one channel (and I3D copies RGB filters unchanged).
    """
    if in_chans < 1:
        raise ConversionError(f"in_chans must be a positive integer, got {in_chans!r}")
    if weight.shape[1] == in_chans:
        return weight.clone()
    if weight.shape[1] != 3:
        raise ConversionError(f"cannot adapt {FIRST_CONV} {list(weight.shape)} to {in_chans} input channels: only "
                              "RGB (3-channel) weights are adapted")
    summed = weight.sum(1, keepdim=True) / in_chans
    return summed.repeat(1, in_chans, *([1] * (weight.dim() - 2))).contiguous()


def fresh_classifier(num_features: int, num_classes: int, like: Tensor, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A new classifier's weight and bias: ``nn.Linear``'s default weights (uniform within 1/sqrt(fan_in)) drawn
    from a generator seeded with ``seed``, so that a converted file is reproducible, and a zero bias, as torchvision
    and MONAI initialise theirs."""
    generator = torch.Generator().manual_seed(seed)
    bound = 1 / math.sqrt(num_features)
    weight = torch.empty(num_classes, num_features).uniform_(-bound, bound, generator=generator)
    return weight.to(like.dtype), torch.zeros(num_classes, dtype=like.dtype)


def adapt_state_dict(state_dict: Mapping[str, Tensor], *, method: str | None = None, in_chans: int | None = None,
                     num_classes: int | None = None) -> tuple[dict[str, Tensor], list[str]]:
    """``state_dict`` (any layout's key names, kept) for ``in_chans`` input channels
    (:func:`adapt_input_channels`), a fresh ``num_classes``-class classifier (:func:`fresh_classifier`; 0: none)
    and, with ``method``, inflated to 3D (:func:`inflate_kernels`); None leaves that part as it is. Returns the
    weights and notes on what changed."""
    names = {canonical_key(key): key for key in state_dict}
    out = dict(state_dict)
    notes = []
    if in_chans is not None:
        key = names.get(FIRST_CONV)
        if key is None:
            raise ConversionError(f"cannot adapt the input channels: no {FIRST_CONV!r}")
        if out[key].shape[1] != in_chans:
            out[key] = adapt_input_channels(out[key], in_chans)
            notes.append(f"adapted {key} to {in_chans} input channel(s): the sum over RGB, divided by {in_chans}")
    if num_classes is not None:
        if num_classes < 0:
            raise ConversionError(f"num_classes must be 0 (no classifier) or more, got {num_classes!r}")
        layout = "monai" if has_layout_keys(state_dict, "monai") else "effidense"
        keys = [names.get(name) or layout_key(name, layout) for name in CLASSIFIER]
        old = out.get(keys[0])
        if old is None or old.shape[0] != num_classes:
            for key in keys:
                out.pop(key, None)
            if num_classes:
                norm = out[names["features.norm5.weight"]] if "features.norm5.weight" in names else None
                features = norm.shape[0] if norm is not None else old.shape[1] if old is not None else None
                if features is None:
                    raise ConversionError("cannot make a classifier: neither 'features.norm5.weight' nor a "
                                          "classifier tells the number of features")
                like = norm if norm is not None else old
                out[keys[0]], out[keys[1]] = fresh_classifier(features, num_classes, like)
            notes.append(f"a fresh {num_classes}-class classifier" if num_classes else "dropped the classifier")
    if method is not None:
        conv0 = out.get(names.get(FIRST_CONV, FIRST_CONV))
        if conv0 is not None and conv0.dim() != 4:
            raise ConversionError(f"{names[FIRST_CONV]!r} is {conv0.dim()}-d: these are {conv0.dim() - 2}D weights "
                                  "already, and only 2D kernels inflate; convert them without --inflate / inflate()")
        out = inflate_kernels(out, method)
        notes.append(f"inflated the 2D kernels to 3D ({method})")
    return out, notes
