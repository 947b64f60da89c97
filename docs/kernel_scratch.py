"""The kernels' scratch on this CPU, measured against the planner's model of it (effidense.planner.scratch).

Each case runs one kernel as a DenseNet step calls it and reads the CPU allocator's events around it
(``effidense.memory.cpu_peak_bytes``): the scratch is the kernel's peak less its outputs. docs/planner.md holds the
table this prints.

    python docs/kernel_scratch.py [--threads 1]
"""
from __future__ import annotations

import argparse

import torch

from effidense.memory import cpu_peak_bytes
from effidense.planner import scratch_model

aten = torch.ops.aten
MiB = 1 << 20


def _nbytes(outputs: object) -> int:
    tensors = outputs if isinstance(outputs, tuple) else (outputs,)
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _measure(op: object, args: tuple) -> tuple[int, object]:
    kept: dict[str, object] = {}

    def run() -> None:
        kept["out"] = op(*args)

    run()  # oneDNN builds its primitive on the first call
    out = kept.pop("out")
    peak = cpu_peak_bytes(run)
    kept.clear()
    return peak - _nbytes(out), out


def _conv(n: int, cin: int, cout: int, k: int, stride: int, edge: int, dims: int = 2, view: bool = False,
          need_input: bool = True) -> list[tuple[str, object, tuple]]:
    x = torch.randn(n, cin, *(edge,) * dims)
    w = torch.randn(cout, cin, *(k,) * dims)
    geometry = ([stride] * dims, [k // 2] * dims, [1] * dims, False, [0] * dims, 1)
    y = aten.convolution(x, w, None, *geometry)
    grad = torch.randn(n, 2 * cout, *y.shape[2:])[:, :cout] if view else torch.randn_like(y)
    shape = "x".join(map(str, x.shape))
    name = f"{k}{'x' + str(k) * (dims > 1)}{'x' + str(k) if dims == 3 else ''} conv {cin}->{cout}, input {shape}"
    return [(f"convolution, {name}", aten.convolution.default, (x, w, None, *geometry)),
            (f"convolution_backward, {name}" + (", gradient a view" if view else "")
             + ("" if need_input else ", weight only"), aten.convolution_backward.default,
             (grad, x, w, None, *geometry, [need_input, True, False]))]


def _batch_norm(shape: tuple[int, ...]) -> tuple[str, object, tuple]:
    x = torch.randn(shape)
    c = shape[1]
    weight, bias = torch.randn(c), torch.randn(c)
    _, mean, invstd, _, _ = torch._batch_norm_impl_index(x, weight, bias, None, None, True, 0.0, 1e-5, False)
    return (f"native_batch_norm_backward, input {'x'.join(map(str, shape))}", aten.native_batch_norm_backward.default,
            (torch.randn_like(x), x, weight, None, None, mean, invstd, True, 1e-5, [True, True, True]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = scratch_model("cpu")
    cases = [_batch_norm((8, 256, 56, 56)), _batch_norm((2, 64, 24, 24, 24)),
             *_conv(8, 3, 64, 7, 2, 224, need_input=False), *_conv(8, 128, 32, 3, 1, 56),
             _conv(8, 128, 32, 3, 1, 56, view=True)[1], *_conv(8, 256, 128, 1, 1, 56), *_conv(20, 256, 128, 1, 1, 28),
             *_conv(2, 128, 32, 3, 1, 24, dims=3), *_conv(2, 256, 128, 1, 1, 24, dims=3),
             *_conv(1, 128, 32, 3, 1, 12, dims=3)]
    print(f"torch {torch.__version__}, {args.threads} thread(s), fp32\n")
    print("| kernel and shape | measured scratch | modelled | model - measured |")
    print("|---|---|---|---|")
    for name, op, op_args in cases:
        measured, out = _measure(op, op_args)
        modelled = model(op, op_args, {}, out)
        print(f"| {name} | {measured / MiB:.3f} MiB | {modelled / MiB:.3f} MiB | "
              f"{(modelled - measured) / MiB:+.3f} MiB |")


if __name__ == "__main__":
    main()
