"""Compile time of the whole model as one graph (set_compile) against eager, DenseNet-BC-100, CPU, first train step."""
import time

import torch
import torch._dynamo

import effidense

x = torch.randn(64, 3, 32, 32)


def first_step(model: torch.nn.Module) -> float:
    start = time.perf_counter()
    model(x).sum().backward()
    return time.perf_counter() - start


for how in ("eager", "whole"):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = effidense.densenet_bc100_k12(memory="efficient")
    if how == "whole":
        model.set_compile()
    first, second = first_step(model), first_step(model)
    print(f"{how:9s} first step {first:7.1f} s, second {second:6.2f} s, compile ~{first - second:6.1f} s", flush=True)
