"""Where pretrained ImageNet weights are found: torchvision's own cache first, then timm's Hugging Face hub.

torchvision keeps its weights as ``$TORCH_HOME/hub/checkpoints/densenet121-a639ec97.pth`` (the name is the end of
the URL of torchvision's weight enum, and holds the first digits of the file's SHA-256). The ``tv_in1k`` weights are
those very files, so a user who ever ran ``torchvision.models.densenet121(weights="DEFAULT")`` has them offline; the
file is read as torchvision reads it from its cache (no hash check: torch checks it when it downloads), its legacy
key names fixed by the legacy row of :data:`effidense.weights.KEY_RULES`. Every other case goes to timm's Hugging
Face hub repositories, or their cache. Where neither has the weights, :class:`WeightsNotFoundError` says in one line
where they were looked for and how to go on.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

__all__ = ["TORCHVISION_WEIGHTS", "WeightsNotFoundError", "not_found_error", "searched_places",
           "torchvision_cache_file", "torchvision_weights", "unreachable_hub"]

# torchvision's weight names (DenseNet121_Weights.IMAGENET1K_V1) -> our tag for the same weights
TORCHVISION_WEIGHTS = {"IMAGENET1K_V1": "tv_in1k"}


class WeightsNotFoundError(FileNotFoundError):
    """Pretrained weights are in no cache and cannot be downloaded; the message says where they were looked for
    (``places``, the same in words)."""

    def __init__(self, message: str, places: str = "") -> None:
        super().__init__(message)
        self.places = places


def torchvision_weights(name: str, tag: str | None) -> Any:
    """torchvision's weight enum member for model ``name``'s weights ``tag`` (e.g. ``DenseNet121_Weights.
    IMAGENET1K_V1`` for ``tv_in1k``), or None where torchvision has no such weights."""
    members = [member for member, ours in TORCHVISION_WEIGHTS.items() if ours == tag]
    if not members:
        return None
    from torchvision.models import get_model_weights

    try:
        enum = get_model_weights(name)
    except ValueError:  # a network torchvision does not have
        return None
    return getattr(enum, members[0], None)


def torchvision_cache_file(weights: Any) -> Path:
    """Where torchvision keeps ``weights`` (a torchvision weight enum member) once downloaded: what
    ``torch.hub.load_state_dict_from_url`` names it, under ``torch.hub.get_dir()`` (``$TORCH_HOME/hub``)."""
    from torch.hub import get_dir

    return Path(get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def searched_places(hf_hub_id: str | None, torchvision_file: Path | None) -> str:
    """Where weights were looked for, in words: torchvision's cached file, the Hugging Face cache and repository."""
    import huggingface_hub

    places = []
    if torchvision_file is not None:
        places.append(f"torchvision's cache ({torchvision_file})")
    if hf_hub_id:
        places.append(f"the Hugging Face cache ({huggingface_hub.constants.HF_HUB_CACHE}, {hf_hub_id})")
    return " and ".join(places) or "no cache"


def unreachable_hub() -> str:
    """How the message says the hub was not reached: where huggingface_hub was let try, with how to skip its retries
    (about a minute offline) next time."""
    import huggingface_hub

    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return "the hub is off (HF_HUB_OFFLINE)"
    return "the hub cannot be reached (HF_HUB_OFFLINE=1 skips it and its retries where there is no network)"


def not_found_error(model: str, tag: str | None, hf_hub_id: str | None,
                    torchvision_file: Path | None) -> WeightsNotFoundError:
    """One line: model ``model``'s weights ``tag`` are in neither cache, where each was looked for, and the two ways
    forward (a local file through timm's ``pretrained_cfg_overlay``, or one converted with ``effidense convert``)."""
    places = searched_places(hf_hub_id, torchvision_file)
    label = f"{model}.{tag}" if tag else model
    return WeightsNotFoundError(
        f"{label}: no pretrained weights offline, and {unreachable_hub()}; looked in {places}. Pass a local "
        f"file: pretrained_cfg_overlay=dict(file='{model}.safetensors'), or convert one first: effidense convert "
        f"--checkpoint <weights.pth> --output {model}.safetensors", places)
