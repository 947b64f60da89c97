"""CUDA checks (``python -m pytest -m cuda``; skipped without a GPU): exactness of the memory modes on the device, the
meter against the allocator, the max-batch search, the compiled paths, one trainer step, and a tiny GPU report.

Tolerances are relative (max |a - b| / max |reference|), from :func:`effidense.verify.tolerance`: fp32 with TF32 off
1e-5 (the modes run the same kernels; only the summation order of gradient contributions may differ), bf16 autocast
2e-2, compiled against eager 1e-4. ``num_batches_tracked`` must match exactly.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import load_tool

from effidense import DenseNet, FCDenseNet, SavedTensorMeter
from effidense.gpu_report import gpu_plan, run_report
from effidense.memory import MiB
from effidense.modelspec import ModelSpec
from effidense.verify import tensor_diff, tolerance

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TINY_BC = dict(growth_rate=8, block_config=(3, 3), num_init_features=16, num_classes=10)
DEVICE = "cuda"


@pytest.fixture
def exact_cuda():
    """fp32 without TF32, deterministic cuDNN algorithms: what exactness is checked under."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
     torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) = saved


def _train_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, amp: bool = False) -> dict:
    model.train()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
        out = model(x)
    F.cross_entropy(out.float(), y).backward()
    return {"out": out.detach().float(),
            "grads": {n: p.grad for n, p in model.named_parameters()},
            "buffers": dict(model.named_buffers())}


def _assert_same(got: dict, ref: dict, tol: float, label: str) -> None:
    diff, scale = tensor_diff(got["out"], ref["out"])
    assert diff <= tol * scale, f"{label}: output differs by {diff:.3g} (scale {scale:.3g})"
    worst = max(tensor_diff(got["grads"][n], g) for n, g in ref["grads"].items())
    scale = max(tensor_diff(g, g)[1] for g in ref["grads"].values())
    assert worst[0] <= tol * scale, f"{label}: gradients differ by {worst[0]:.3g} (scale {scale:.3g})"
    for name, b in ref["buffers"].items():
        if name.endswith("num_batches_tracked"):
            assert torch.equal(got["buffers"][name], b), f"{label}: {name}"
        else:
            diff, scale = tensor_diff(got["buffers"][name], b)
            assert diff <= tol * max(scale, 1.0), f"{label}: buffer {name} differs by {diff:.3g}"


def _models(**kwargs) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    base = DenseNet(**TINY_BC, **kwargs, memory="plain")
    return {mode: copy.deepcopy(base).set_memory(mode).to(DEVICE) for mode in ("plain", "efficient", "frugal")}


def _data(batch: int = 8, img: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, img, img, generator=generator)
    y = torch.randint(0, 10, (batch,), generator=generator)
    return x.to(DEVICE), y.to(DEVICE)


@pytest.mark.parametrize("channels_last", [False, True])
def test_modes_equal_plain_fp32_tf32_off(exact_cuda, channels_last):
    x, y = _data()
    results = {}
    for mode, model in _models().items():
        if channels_last:
            model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        results[mode] = _train_step(model, x, y)
    for mode in ("efficient", "frugal"):
        _assert_same(results[mode], results["plain"], tolerance(torch.float32, "cuda"), mode)


def test_modes_with_dropout_equal_plain(exact_cuda):
    """Efficient and frugal draw each layer's dropout mask again in backward, from the CUDA random state forward drew
    it from (the fused kernel's seed and offset): the step is plain's, whose autograd keeps the mask."""
    x, y = _data()
    results = {}
    for mode, model in _models(drop_rate=0.2).items():
        torch.manual_seed(3)  # the same draws for every mode
        results[mode] = _train_step(model, x, y)
    for mode in ("efficient", "frugal"):
        _assert_same(results[mode], results["plain"], tolerance(torch.float32, "cuda"), mode)


def test_3d_modes_equal_plain_fp32_tf32_off(exact_cuda):
    """Volumes: the light stem (conv3d, BatchNorm3d, max_pool3d) and segments on cuDNN's 3D kernels."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 24, 24, 24, generator=generator).to(DEVICE)
    y = torch.randint(0, 10, (2,), generator=generator).to(DEVICE)
    results = {mode: _train_step(model, x, y) for mode, model in _models(spatial_dims=3, in_chans=1).items()}
    for mode in ("efficient", "frugal"):
        _assert_same(results[mode], results["plain"], tolerance(torch.float32, "cuda"), mode)


def test_modes_equal_plain_bf16_autocast(exact_cuda):
    x, y = _data()
    results = {mode: _train_step(model, x, y, amp=True) for mode, model in _models().items()}
    for mode in ("efficient", "frugal"):
        _assert_same(results[mode], results["plain"], tolerance(torch.float32, "cuda", amp="bf16"), mode)


def test_meter_matches_the_allocator():
    """What the meter counts is what the allocator holds for backward after the forward (same order), and both rank
    the modes alike."""
    x, y = _data(batch=16, img=64)
    meter_bytes, held_bytes = {}, {}
    for mode, model in _models().items():
        model.train()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        with SavedTensorMeter(exclude=model) as meter:
            loss = F.cross_entropy(model(x), y)
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated() - before + x.numel() * x.element_size()  # x predates `before`
        meter_bytes[mode], held_bytes[mode] = meter.bytes, held
        loss.backward()
        del loss
        assert 0.5 <= held / meter.bytes <= 2.0, (mode, held / MiB, meter.bytes / MiB)
    assert meter_bytes["plain"] > meter_bytes["efficient"] > meter_bytes["frugal"]
    assert held_bytes["plain"] > held_bytes["efficient"] > held_bytes["frugal"]


@pytest.mark.parametrize("how", ["set_compile", "torch.compile"])
def test_compiled_paths_equal_eager(exact_cuda, how):
    torch._dynamo.reset()
    x, y = _data()
    eager = _models()["efficient"]
    compiled = copy.deepcopy(eager)
    compiled = compiled.set_compile(True) if how == "set_compile" else torch.compile(compiled)
    ref = _train_step(eager, x, y)
    got = _train_step(compiled, x, y)
    got["grads"] = {n.removeprefix("_orig_mod."): g for n, g in got["grads"].items()}
    got["buffers"] = {n.removeprefix("_orig_mod."): b for n, b in got["buffers"].items()}
    _assert_same(got, ref, tolerance(torch.float32, "cuda", compiled=True), how)


TINY_SPEC = ModelSpec("tiny DenseNet-BC", TINY_BC)


def test_tiny_gpu_report_runs_every_section_but_correctness(tmp_path: Path):
    """Every section's GPU path (bench on the device, its largest-batch search, the planner against
    max_memory_allocated, volumes against MONAI) on a tiny model; the correctness section would run this very test
    file again, so it is left out."""
    sections = ["step-time", "max-batch", "prediction", "3d"]
    plan = gpu_plan(300, "custom", TINY_BC, img_size=32, batch=8, edge=16)
    report = run_report(plan, tmp_path, sections)
    assert {n: s["status"] for n, s in report["sections"].items()} == dict.fromkeys(sections, "ok"), report
    rows = report["sections"]["step-time"]["data"]["commands"][0]["result"]["results"]
    assert all(r["status"] == "ok" and r["peak_bytes"] > 0 and r["step_ms"] > 0 for r in rows), rows
    searched = report["sections"]["max-batch"]["data"]["commands"][0]["result"]["results"]
    assert all(r["max_batch"] > 0 for r in searched), searched
    points = [p for r in report["sections"]["prediction"]["data"]["rows"] for p in r["points"]]
    assert len(points) == 12 and all(p["measured_bytes"] > 0 for p in points)
    assert json.loads((tmp_path / "report.json").read_text())["complete"]


def test_one_trainer_step_on_cuda(tmp_path: Path):
    tool = load_tool("train")
    argv = ["--model", "effi_densenet_bc100_k12", "--model-kwargs", "block_config=(2,2)", "growth_rate=4",
            "num_init_features=8", "--dataset", "synthetic", "--img-size", "8", "-b", "8", "--train-num-samples",
            "8", "--val-num-samples", "8", "-j", "0", "--warmup-epochs", "0", "--epochs", "1", "--device", "cuda",
            "--amp", "--amp-dtype", "bfloat16", "--channels-last", "--output", str(tmp_path), "--experiment", "cuda"]
    assert tool.main(argv) == 0
    assert (tmp_path / "cuda" / "summary.csv").is_file()


@pytest.mark.parametrize("amp", [False, True])
@pytest.mark.parametrize("mode", ["efficient", "frugal"])
def test_sliced_backward_on_cuda(mode, amp, exact_cuda):
    """The sliced backward on the device (cuDNN's BatchNorm, its statistics saved from forward), fp32 and bf16
    autocast: the plain model's step, within the order of float sums (bf16's own rounding under autocast)."""
    torch.manual_seed(0)
    base = DenseNet(**TINY_BC).to(DEVICE)
    x = torch.randn(6, 3, 64, 64, device=DEVICE)
    y = torch.randint(0, 10, (6,), device=DEVICE)
    ref = _train_step(copy.deepcopy(base).set_memory("plain"), x, y, amp)
    sliced = copy.deepcopy(base).set_memory(mode)
    sliced.backward_slices = 3
    _assert_same(_train_step(sliced, x, y, amp), ref, 2e-2 if amp else 1e-4, f"{mode} sliced")


@pytest.mark.parametrize("amp", [False, True])
def test_sliced_forward_normalises_each_map_as_the_whole_on_cuda(amp, exact_cuda, monkeypatch):
    """A sliced segment's forward runs BatchNorm's kernel (cuDNN's where it applies) on each map's channels: the
    outputs and running statistics of the kernel run on the concatenation, bitwise, in fp32 and bf16 autocast."""
    import effidense.layers.light as light
    from effidense import DenseBlock
    torch.manual_seed(0)
    base = DenseBlock(3, 64, 32, bn_size=2, memory="frugal", backward_slices=2).to(DEVICE)
    x = torch.randn(4, 64, 32, 32, device=DEVICE, requires_grad=True)
    runs = []
    for apart in (True, False):
        if not apart:
            monkeypatch.setattr(light, "_layout", lambda t: None)
        block = copy.deepcopy(base)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            maps = block.run([x])
        runs.append((maps, block.state_dict()))
    (maps, state), (whole_maps, whole_state) = runs
    assert all(torch.equal(a, b) for a, b in zip(maps, whole_maps, strict=True))
    assert all(torch.equal(state[k], whole_state[k]) for k in state)


@pytest.mark.parametrize("amp", [False, True])
def test_frugal_last_layer_with_its_transition_on_cuda(amp, exact_cuda, monkeypatch):
    """A frugal block's last layer and the sliced transition after it as one checkpoint on the device, fp32 and bf16
    autocast: the transition empties the layer's features once normalised and the rerun rebuilds them, so outputs,
    running statistics and gradients are bitwise those of the two run apart."""
    from effidense import Transition
    torch.manual_seed(0)
    base = DenseNet(growth_rate=16, block_config=(4, 1), num_init_features=8, bn_size=None, num_classes=5,
                    drop_rate=0.2, small_inputs=True, memory="frugal", backward_slices=2).to(DEVICE)
    x = torch.randn(4, 3, 32, 32, device=DEVICE)
    runs, fused = [], []
    frees_after = Transition.frees_after
    for apart in (False, True):
        monkeypatch.setattr(Transition, "frees_after", (lambda *args: False) if apart else
                            (lambda *args: fused.append(frees_after(*args)) or fused[-1]))
        model = copy.deepcopy(base)
        torch.manual_seed(1)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            out = model(x)
        out.float().square().sum().backward()
        runs.append((out, model.state_dict(), [p.grad for p in model.parameters()]))
    (out, state, grads), (out_apart, state_apart, grads_apart) = runs
    assert fused == [True]
    assert torch.equal(out, out_apart) and all(torch.equal(state[k], state_apart[k]) for k in state)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_apart, strict=True))


@pytest.mark.parametrize("amp", [False, True])
def test_fcdensenet_sliced_frugal_on_cuda(amp, exact_cuda):
    """FC-DenseNet's sliced frugal step on the device: its layers and classifier sum each map's gradient in one place
    (``GradSlot``); the plain model's step within the order of float sums."""
    torch.manual_seed(0)
    base = FCDenseNet(2, 3, 4, down_blocks=(2, 2), up_blocks=(2, 2), bottleneck_layers=2, growth_rate=4,
                      init_features=8, drop_rate=0.0).to(DEVICE)
    x = torch.randn(4, 3, 32, 32, device=DEVICE)
    y = torch.randint(0, 4, (4, 32, 32), device=DEVICE)
    ref = _train_step(copy.deepcopy(base).set_memory("plain"), x, y, amp)
    sliced = copy.deepcopy(base).set_memory("frugal")
    sliced.backward_slices = 2
    _assert_same(_train_step(sliced, x, y, amp), ref, 2e-2 if amp else 1e-4, "FC-DenseNet frugal sliced")


@pytest.mark.parametrize("amp", [False, True])
def test_fcdensenet_sliced_transition_down_with_dropout_on_cuda(amp, exact_cuda):
    """A frugal transition down, sliced, with dropout on the device: forward runs the plain model's fused dropout
    (its output bitwise plain's under the same seed), the mask drawn once more beside it and kept as bits; backward
    goes back through the pool and the mask a slice at a time: the plain model's step within the order of float
    sums."""
    torch.manual_seed(0)
    base = FCDenseNet(2, 3, 4, down_blocks=(2, 2), up_blocks=(2, 2), bottleneck_layers=2, growth_rate=4,
                      init_features=8, drop_rate=0.3).to(DEVICE)
    x = torch.randn(4, 3, 32, 32, device=DEVICE)
    y = torch.randint(0, 4, (4, 32, 32), device=DEVICE)
    torch.manual_seed(1)
    ref = _train_step(copy.deepcopy(base).set_memory("plain"), x, y, amp)
    sliced = copy.deepcopy(base).set_memory("frugal")
    sliced.backward_slices = None
    for down in sliced.transitions_down:
        down.backward_slices = 2
    torch.manual_seed(1)
    got = _train_step(sliced, x, y, amp)
    assert torch.equal(got["out"], ref["out"])
    _assert_same(got, ref, 2e-2 if amp else 1e-4, "FC-DenseNet sliced transition down")
