"""The checkpoint layouts :mod:`effidense.convert` reads and writes, and its choices, without torch: the
``effidense convert`` command checks its flags against them before its heavy imports."""
from __future__ import annotations

__all__ = ["LAYOUTS", "LAYOUT_ALIASES", "INFLATE_METHODS", "VERIFY_TOLERANCE"]

# checkpoint layouts effidense.convert reads and writes (2D), and the seed converter's --to spellings
LAYOUTS = ("effidense", "torchvision", "timm", "monai")
INFLATE_METHODS = ("mean", "center")  # effidense.convert.inflate: 2D kernels to 3D
LAYOUT_ALIASES = {"efficient": "effidense", "normal": "torchvision"}
VERIFY_TOLERANCE = 1e-5  # the largest output difference `convert --verify` accepts
