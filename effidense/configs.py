"""The named configurations (:data:`CONFIGS`, re-exported by :mod:`effidense.registry`), the names ``--model`` takes
and the one-line message for an unknown name, without torch: the ``effidense`` command reads them to answer
``--help``, list models and refuse bad names in well under a second.
"""
from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

__all__ = ["CONFIGS", "model_names", "unknown_model_message", "suggest"]

# name: DenseNet arguments (growth_rate, block_config, num_init_features, and where they differ from DenseNet's
# defaults bn_size, compression, small_inputs, num_classes)
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

def model_names() -> list[str]:
    """Names ``--model`` accepts: every timm name ``effi_<config>``, the bare config names, and ``custom``."""
    return [f"effi_{name}" for name in CONFIGS] + list(CONFIGS) + ["custom"]


def suggest(name: str, known: Sequence[str]) -> str:
    """``"did you mean 'x'?"`` for the nearest of ``known`` (difflib), or ``""`` when none is near."""
    near = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return f"did you mean {near[0]!r}?" if near else ""


def unknown_model_message(name: str, known: Sequence[str] | None = None) -> str:
    """One line for an unknown model ``name``: the nearest known name, and where to see them all."""
    known = model_names() if known is None else known
    hint = suggest(name, known) or "no name is close"
    return f"unknown model {name!r}; {hint} (`effidense models` lists all {len(known)})"
