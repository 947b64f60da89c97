"""The names the tools' flags choose from, without torch: the variants they compare (our memory modes, the peers,
compiled copies), torch.compile's modes and the autocast dtypes. The commands build their parsers from these, so
that ``--help`` and usage errors answer before torch is imported; the harness and the benchmark use the same ones."""
from __future__ import annotations

from .arguments import MEMORY_MODES

__all__ = ["MEMORY_MODES", "PEERS", "COMPILE_SUFFIX", "COMPILE_MODES", "AMP_NAMES"]

# The one peers table: every tool (bench, plan, gpu-report) names the peers so.
PEERS = {
    "tv": "torchvision memory_efficient=True",
    "timm": "timm set_grad_checkpointing()",
    "tv-plain": "torchvision plain",
    "monai": "MONAI DenseNet (keeps everything; 1-3 spatial dims)",
}
COMPILE_SUFFIX = "+compile"
# torch.compile's modes (torch._inductor.list_mode_options()); "reduce-overhead" adds CUDA graphs on a GPU
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
AMP_NAMES = ("bf16", "fp16")  # --amp's choices; effidense.harness.AMP_DTYPES maps them to torch's dtypes
