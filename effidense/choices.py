"""The names the tools' flags choose from, without torch: the variants they compare (our memory modes, the peers,
compiled copies), torch.compile's modes and the autocast dtypes. The commands build their parsers from these, so
that ``--help`` and usage errors answer before torch is imported; the harness and the benchmark use the same ones."""
from __future__ import annotations

from .arguments import MEMORY_MODES

__all__ = ["MEMORY_MODES", "PEERS", "COMPILE_SUFFIX", "COMPILE_MODES", "AMP_NAMES", "OPTIMIZERS", "DTYPE_NAMES",
           "SEGMENTATION_MODELS", "MONAI_MODELS", "REPORT_SECTIONS"]

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
# The planner's: the optimizer whose state a step holds (effidense.harness.StepSpec), the parameters' dtype
# (effidense.planner.DTYPES maps them) and FC-DenseNet's configurations (effidense.fcdensenet.FCDENSENET_CONFIGS)
OPTIMIZERS = ("none", "sgd", "sgd-momentum", "adamw")
DTYPE_NAMES = ("fp32", "bf16", "fp16")
SEGMENTATION_MODELS = ("fcdensenet56", "fcdensenet67", "fcdensenet103")
MONAI_MODELS = ("DenseNet121", "DenseNet169", "DenseNet201", "DenseNet264")  # effidense.monai's, as MONAI names them

# gpu-report's sections, in the order they run: (title, share of the time budget). Shares are of what is left when the
# section starts, so time one section leaves unused goes to the later ones.
REPORT_SECTIONS: dict[str, tuple[str, float]] = {
    "step-time": ("Step time, images/s and memory beside torchvision and timm (effidense bench)", 0.35),
    "max-batch": ("Largest batch that trains on the whole GPU (effidense bench --max-batch)", 0.20),
    "prediction": ("The planner's predicted peak against a measured step (effidense plan --check)", 0.10),
    "3d": ("Volumes: our modes against MONAI's DenseNet (effidense bench --spatial-dims 3)", 0.15),
    "correctness": ("Correctness on the device: effidense gradcheck and pytest -m cuda", 0.20),
}
