"""DenseNet-121 with peft's LoRA on every convolution: torchvision's and effidense's in each mode, on the CPU.

For each it prints what one forward keeps for backward (the meter, ``effidense.saved_activation_bytes``) and the
peak of a forward and backward above the model and batch (the CPU allocator's, ``effidense.memory.cpu_peak_bytes``).
docs/training.md holds the table.

    python docs/lora_memory.py [--img-size 224] [--batch-size 4] [--rank 8] [--threads 2]

Needs peft (``pip install peft``), which effidense does not depend on.
"""
from __future__ import annotations

import argparse

import torch
import torchvision
from peft import LoraConfig, get_peft_model

import effidense
from effidense.memory import cpu_peak_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    builders = {"torchvision": torchvision.models.densenet121}
    builders.update({mode: lambda mode=mode: effidense.densenet121(memory=mode)
                     for mode in ("plain", "efficient", "frugal")})
    for label, build in builders.items():
        torch.manual_seed(0)
        config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=r".*conv\d?",
                            modules_to_save=["classifier"])
        model = get_peft_model(build(), config).train()

        def step(model: torch.nn.Module = model) -> None:
            model.zero_grad(set_to_none=True)
            model(x).logsumexp(1).sum().backward()

        step()  # the adapters' gradients exist before the measured step, as in training
        saved = effidense.saved_activation_bytes(model, x)
        print(f"{label:12s} saved {saved / 2**20:8.1f} MiB  step peak {cpu_peak_bytes(step) / 2**20:8.1f} MiB",
              flush=True)


if __name__ == "__main__":
    main()
