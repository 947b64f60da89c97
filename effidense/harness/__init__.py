"""What every tool runs a model with: bench, plan, gradcheck and gpu-report share it, and none of them is built on
another.

* :mod:`.step` the one training step (zero_grad, forward under autocast, fp32 cross-entropy, backward, the optional
  optimizer update), its batch, the clock, threads and device memory
* :mod:`.variants` the variants the tools compare: our memory modes, the torchvision/timm/MONAI peers (the one place
  that builds them and says why one cannot hold a model), ``+compile`` copies
* :mod:`.footprint` the step's memory counted storage by storage, on fake or real tensors (:class:`StepProbe`)
* :mod:`.shapes` fake kernels' answers remembered across batch sizes, so a fake step at a new batch is quick
* :mod:`.search` the largest batch (or depth) that fits, by doubling and bisection
* :mod:`.distributed` process groups for the tools that run under DDP
* :mod:`.environment` versions, hardware and the command line of a run
"""
from .distributed import backend_for, check_world, free_port, process_group, torchrun_world
from .environment import TORCHRUN_ENV, command_line, environment
from .footprint import OPTIMIZERS, StepMemory, StepProbe, StepSpec
from .search import bisect_fits, largest_batch
from .step import (
    AMP_DTYPES,
    CHANNELS_LAST,
    Step,
    Timer,
    autocast,
    input_shape,
    make_batch,
    release,
    step_loss,
    torch_threads,
    training_step,
)
from .variants import (
    COMPILE_SUFFIX,
    PEER_LIBRARIES,
    PEER_LIBRARY,
    PEERS,
    build_peer,
    build_variant,
    compile_model,
    load_weights,
    monai_variants,
    parse_variants,
    peer_limits,
    peer_unsupported,
)

__all__ = ["AMP_DTYPES", "CHANNELS_LAST", "COMPILE_SUFFIX", "OPTIMIZERS", "PEERS", "PEER_LIBRARIES", "PEER_LIBRARY",
           "TORCHRUN_ENV", "Step", "StepMemory", "StepProbe", "StepSpec", "Timer", "autocast", "bisect_fits",
           "build_peer", "build_variant", "command_line", "compile_model", "environment", "input_shape",
           "largest_batch", "load_weights", "make_batch", "monai_variants", "parse_variants", "peer_limits",
           "peer_unsupported",
           "release", "step_loss", "torch_threads", "training_step", "backend_for", "check_world", "free_port",
           "process_group", "torchrun_world"]
