"""tools/gradcheck.py and effidense.verify on tiny models, CPU only."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import load_tool

import effidense.verify
from effidense.layers.norm import BatchNormAct
from effidense.verify import (
    TINY_BC,
    Case,
    autograd_gradcheck,
    compare_modes,
    compare_tensors,
    format_report,
    tensor_diff,
    tolerance,
)


@pytest.fixture(scope="module")
def gradcheck():
    return load_tool("gradcheck")


def run_main(module, argv, capsys):
    code = module.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_default_run_passes(gradcheck, capsys, tmp_path):
    json_path = tmp_path / "checks.json"
    code, out, _ = run_main(gradcheck, ["--quiet", "--json", str(json_path)], capsys)
    assert code == 0, out
    assert "PASS: all" in out and "FAIL" not in out
    # Every setting of the issue appears, for both memory modes.
    for case in ("fp32", "dropout 0.2", "BN momentum=None", "channels_last", "fp64", "autocast bf16"):
        for variant in ("efficient", "frugal"):
            assert any(line.startswith(f"tiny DenseNet-BC / {case}") and f" {variant} " in line and
                       line.rstrip().endswith("PASS") for line in out.splitlines()), (case, variant)
    assert "[gradcheck] gradcheck DenseNet-BC / float64, train mode: frugal" in out
    assert "torch.autograd.gradcheck" in out

    data = json.loads(json_path.read_text())
    assert data["schema"] == "effidense.gradcheck/1" and data["passed"] is True
    kinds = {c["what"] for c in data["checks"]}
    assert {"output", "loss", "grads", "BN stats", "BN count", "params", "eval output", "eval grads"} <= kinds
    counts = [c for c in data["checks"] if c["what"] == "BN count"]
    assert counts and all(c["tol"] == 0 and c["max_abs"] == 0 for c in counts)
    assert data["environment"]["torch"] == torch.__version__


def test_detects_double_batchnorm_update(gradcheck, capsys, monkeypatch):
    # What torchvision and timm do: the recomputed segment calls the BatchNorm module, which updates its running
    # statistics again on every recomputation.
    monkeypatch.setattr(BatchNormAct, "forward", lambda norm, *maps, cache=None:
                        torch.nn.modules.batchnorm._BatchNorm.forward(norm, torch.cat(maps, 1)))
    code, out, _ = run_main(gradcheck, ["--quiet", "--skip-gradcheck", "--steps", "1"], capsys)
    assert code == 1
    assert "FAIL:" in out
    failures = out.split("FAIL:", 1)[1]
    assert "efficient: BN count" in failures and "frugal: BN count" in failures
    # 7 set before the step; the plain model tracks it once (8), recomputation adds one more.
    assert "num_batches_tracked: 9 != 8" in failures
    assert "efficient: BN stats" in failures


@pytest.mark.slow
def test_ddp_two_gloo_processes(gradcheck, capsys):
    code, out, _ = run_main(gradcheck, ["--quiet", "--nproc", "2", "--skip-modes", "--skip-gradcheck"], capsys)
    assert code == 0, out
    assert "DDP 2 ranks (gloo)" in out
    for mode in ("plain", "efficient", "frugal"):
        assert f"DDP 2 ranks (gloo), fp32: {mode}" in out
    for what in ("train: gradients == single process, sum over rank shards",
                 "eval: gradients == single process on the full batch",
                 "train: num_batches_tracked (exact)", "train: gradients identical on all ranks",
                 "parameters identical on all ranks after an SGD step", "train: gradients == plain under DDP"):
        assert what in out
    assert "PASS: all 25 checks passed" in out


@pytest.mark.slow
def test_ddp_sync_batchnorm(gradcheck, capsys):
    argv = ["--quiet", "--nproc", "2", "--sync-bn", "--skip-modes", "--skip-gradcheck"]
    code, out, _ = run_main(gradcheck, argv, capsys)
    assert code == 0, out
    for mode in ("plain", "efficient", "frugal"):
        assert f"DDP 2 ranks (gloo), SyncBatchNorm, fp32: {mode}" in out
    assert "train: gradients == single process on the full batch" in out
    assert "train: BN running stats == single process on the full batch" in out
    assert "sum over rank shards" not in out
    assert "PASS: all 25 checks passed" in out


def test_sync_bn_needs_ddp(gradcheck, capsys):
    code, _, err = run_main(gradcheck, ["--sync-bn", "--skip-modes", "--skip-gradcheck"], capsys)
    assert code == 2 and "--sync-bn is a DDP check" in err


def test_custom_model_flags(gradcheck, capsys):
    argv = ["--quiet", "--skip-gradcheck", "--steps", "1", "--threads", "1", "--growth-rate", "4",
            "--block-config", "1,1", "--num-init-features", "8", "--small-inputs", "--img-size", "8",
            "--batch-size", "2"]
    code, out, _ = run_main(gradcheck, argv, capsys)
    assert code == 0, out
    assert "models: custom (depth 7, blocks (1, 1)" in out
    assert "custom / fp64" in out


@pytest.mark.parametrize("argv, message", [
    (["--amp", "fp16"], "--amp fp16 is for GPUs"),
    (["--batch-size", "1"], "batch_size >= 2"),
    (["--model", "effi_densenet999"], "unknown model"),
])
def test_bad_arguments(gradcheck, capsys, argv, message):
    code, _, err = run_main(gradcheck, ["--quiet"] + argv, capsys)
    assert code == 2
    assert message in err


def test_compare_modes_compiled_variant():
    spec = TINY_BC.__class__("tiny", dict(growth_rate=4, block_config=(1, 1), num_init_features=8,
                                          small_inputs=True, num_classes=3))
    checks = compare_modes(Case("fp32", spec), ["efficient+compile"], steps=1, batch_size=2, img_size=8)
    assert {c.subject for c in checks} == {"efficient+compile"}
    assert all(c.passed for c in checks), [c for c in checks if not c.passed]
    assert all(c.tol == tolerance(torch.float32, "cpu", compiled=True) for c in checks if c.what != "BN count")


def test_autograd_gradcheck_detects_wrong_backward(monkeypatch):
    class WrongGradReLU(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clamp(min=0)

        @staticmethod
        def backward(ctx, grad):
            return grad * 0.5  # wrong on purpose

    monkeypatch.setattr(BatchNormAct, "forward", lambda norm, *maps, cache=None: WrongGradReLU.apply(
        F.batch_norm(torch.cat(maps, 1), None, None, norm.weight, norm.bias, True, 0.0, norm.eps)))
    checks = autograd_gradcheck("efficient")
    assert not any(c.passed for c in checks)
    assert "GradcheckError" in checks[0].detail


def test_compare_and_report_helpers():
    assert tensor_diff(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.5])) == (0.5, 2.5)
    assert tensor_diff(torch.tensor([float("nan")]), torch.tensor([1.0]))[0] == math.inf
    assert tensor_diff(torch.tensor([float("nan")]), torch.tensor([float("nan")])) == (0.0, 0.0)
    ok = compare_tensors("modes", "c", "s", "grads", {"a": torch.ones(2), "b": torch.zeros(2)},
                  {"a": torch.ones(2), "b": torch.zeros(2)}, 1e-6)
    assert ok.passed and ok.max_abs == 0 and "bitwise" in ok.detail
    # Relative to the largest reference magnitude of the check, so near-zero gradients do not flag noise.
    noisy = compare_tensors("modes", "c", "s", "grads", {"a": torch.ones(2), "b": torch.full((2,), 1e-9)},
                     {"a": torch.ones(2), "b": torch.zeros(2)}, 1e-6)
    assert noisy.passed and noisy.max_rel == pytest.approx(1e-9)
    counts = compare_tensors("modes", "c", "s", "BN count", {"n": torch.tensor(2)}, {"n": torch.tensor(1)}, 0.0)
    assert not counts.passed and "n: 2 != 1" in counts.detail
    missing = compare_tensors("modes", "c", "s", "grads", {"a": None}, {"a": torch.ones(1)}, 1e-6)
    assert not missing.passed and "a: missing" in missing.detail
    report = format_report([ok, counts])
    assert "FAIL: 1 of 2 checks failed" in report and "DIFF!" in report
    assert format_report([]).endswith("FAIL: nothing was checked")
    assert tolerance(torch.float64, "cpu") < tolerance(torch.float32, "cpu") < tolerance(torch.float32, "cuda")
    assert tolerance(torch.float32, "cpu", amp="bf16") > tolerance(torch.float32, "cpu", compiled=True)


def test_tensor_diff_follows_assert_close():
    # Infinities in the same places compare like NaNs do: equal, and the finite values still measured
    # (the hand-written version made the difference NaN here).
    inf = math.inf
    assert tensor_diff(torch.tensor([inf, 1.0, -inf]), torch.tensor([inf, 3.0, -inf])) == (2.0, 3.0)
    assert tensor_diff(torch.tensor([inf]), torch.tensor([-inf]))[0] == math.inf
    assert tensor_diff(torch.tensor([5.0]), torch.tensor([inf]))[0] == math.inf
    assert tensor_diff(torch.ones(2), torch.ones(3))[0] == math.inf
    assert tensor_diff(torch.ones(2, dtype=torch.float16), torch.ones(2)) == (0.0, 1.0)  # dtypes may differ


def run_cli(module, argv, capsys):
    try:
        code = module.main(argv)
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("argv, message", [
    (["--nproc", "-1"], "argument --nproc: must be at least 1, got -1"),
    (["--steps", "0"], "argument --steps: must be at least 1, got 0"),
    (["--json", "/proc/effidense-gradcheck.json"], "--json: cannot write /proc/effidense-gradcheck.json"),
    (["--model-kwargs", "growth_rate"], "argument --model-kwargs: 'growth_rate' is not KEY=VALUE"),
    (["--seed", str(10 ** 23)], f"argument --seed: must be between {-2 ** 63} and {2 ** 63 - 1}, got {10 ** 23}"),
    (["--threads", "100000000000"], "argument --threads: must be at most"),
    (["--batch-size", str(4 * 10 ** 18)], f"batch {4 * 10 ** 18} of 32x32 inputs is too large: the step's maps"),
    (["--spatial-dims", "3", "--img-size", str(3 * 10 ** 6)], "inputs is too large"),
])
def test_bad_input_is_one_line_before_any_check(gradcheck, capsys, monkeypatch, argv, message):
    monkeypatch.setattr(effidense.verify, "run_local_checks", lambda *a, **k: pytest.fail("checks ran before error"))
    code, out, err = run_cli(gradcheck, ["--quiet"] + argv, capsys)
    assert code == 2 and out == "" and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and message in err


def test_device_cuda_without_gpu(gradcheck, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, out, err = run_cli(gradcheck, ["--quiet", "--device", "cuda"], capsys)
    assert code == 2 and out == "" and err.strip().endswith("--device cuda: torch sees no CUDA device "
                                                             "(torch.cuda.is_available() is False) (see --help)")


def test_json_write_failure_is_one_line(gradcheck, capsys, monkeypatch, tmp_path):
    import errno

    import effidense.fileio

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(effidense.fileio, "atomic_write_bytes", full)  # where the command looks it up
    path = tmp_path / "checks.json"
    argv = ["--quiet", "--skip-modes", "--json", str(path)]
    code, out, err = run_cli(gradcheck, argv, capsys)
    assert code == 1 and "PASS: all" in out and not path.exists()
    assert err.strip() == f"effidense gradcheck: error: --json: cannot write {path}: [Errno 28] No space left on " \
                          f"device: '{path}'"


def test_model_kwargs_key_value(gradcheck, capsys):
    argv = ["--quiet", "--skip-gradcheck", "--steps", "1", "--img-size", "8", "--batch-size", "2", "--model",
            "custom", "--model-kwargs", "growth_rate=4", 'block_config=(1,1)', "num_init_features=8",
            "small_inputs=True"]
    code, out, _ = run_cli(gradcheck, argv, capsys)
    assert code == 0, out
    assert "models: custom (depth 7, blocks (1, 1)" in out


def test_an_image_size_too_small_for_the_model_is_refused_up_front(gradcheck, capsys, monkeypatch):
    def no_checks(*args, **kwargs):
        raise AssertionError("checks ran with an image the model cannot take")

    monkeypatch.setattr(effidense.verify, "run_local_checks", no_checks)
    code, out, err = run_cli(gradcheck, ["--quiet", "--img-size", "1"], capsys)
    assert code == 2 and out == ""
    assert err.strip() == "effidense gradcheck: error: --img-size 1: tiny DenseNet-BC needs inputs of at least 5x5"


def test_spatial_dims_3_checks_the_tiny_models_on_volumes(gradcheck, capsys):
    # --spatial-dims was ignored for the default models (2D checks reported as 3D ones), and a 3D model was fed
    # images: every check failed, a false report that the memory modes are wrong.
    argv = ["--quiet", "--skip-gradcheck", "--spatial-dims", "3", "--img-size", "16", "--steps", "1",
            "--batch-size", "2", "--threads", "1"]
    code, out, _ = run_cli(gradcheck, argv, capsys)
    assert code == 0, out
    assert "batch 2, 16x16x16," in out and "PASS: all" in out
    assert "tiny DenseNet-BC, 3D / channels_last_3d" in out and "spatial_dims=3" in out


def test_a_custom_3d_model_and_a_1d_one_pass(gradcheck, capsys):
    custom = ["--quiet", "--skip-gradcheck", "--steps", "1", "--batch-size", "2", "--threads", "1",
              "--growth-rate", "4", "--block-config", "1,1", "--num-init-features", "8", "--small-inputs"]
    code, out, _ = run_cli(gradcheck, custom + ["--spatial-dims", "3", "--img-size", "8"], capsys)
    assert code == 0, out
    assert "8x8x8" in out and "custom / channels_last_3d" in out and "PASS: all" in out
    code, out, _ = run_cli(gradcheck, custom + ["--spatial-dims", "1", "--img-size", "16", "--in-chans", "2"], capsys)
    assert code == 0, out
    assert "batch 2, 16," in out and "PASS: all" in out
    assert "channels_last" not in out  # a signal has no channels-last layout: that case is left out, not failed


def test_too_small_a_volume_is_refused_in_its_own_shape(gradcheck, capsys, monkeypatch):
    monkeypatch.setattr(effidense.verify, "run_local_checks", lambda *a, **k: pytest.fail("checks ran"))
    code, out, err = run_cli(gradcheck, ["--quiet", "--spatial-dims", "3", "--img-size", "1"], capsys)
    assert code == 2 and out == ""
    assert err.strip() == "effidense gradcheck: error: --img-size 1: tiny DenseNet-BC, 3D needs inputs of at least " \
                          "5x5x5"


@pytest.mark.parametrize("dims", [1, 3])
def test_autograd_gradcheck_in_the_models_spatial_dims(dims, monkeypatch):
    from effidense.verify import VerifyConfig, local, run_local_checks

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny float64 convolutions run fastest on one thread
    try:
        checks = autograd_gradcheck("efficient", spatial_dims=dims)
    finally:
        torch.set_num_threads(threads)
    assert all(c.passed for c in checks) and f"{dims}D / float64" in checks[0].case
    seen = []
    monkeypatch.setattr(local, "autograd_gradcheck",
                        lambda mode, device, seed, d, segmentation: seen.append((mode, d)) or [])
    spec = TINY_BC.__class__("tiny", {**TINY_BC.kwargs, "spatial_dims": dims})
    run_local_checks(VerifyConfig(specs=[spec], modes=False))
    assert seen == [("plain", dims), ("efficient", dims), ("frugal", dims)]


def test_running_out_of_memory_is_one_error_line_not_a_fail_per_check(gradcheck, capsys, monkeypatch):
    # Every check failed with the allocator's message, a report that the modes were wrong.
    from effidense.verify import local

    def no_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried "
                           "to allocate 1228800000000000 bytes")

    monkeypatch.setattr(local, "input_batch", no_memory)
    code, out, err = run_cli(gradcheck, ["--quiet", "--skip-gradcheck"], capsys)
    assert code == 1 and out == "" and "Traceback" not in err
    assert err.strip().startswith("effidense gradcheck: error: out of memory: [enforce fail")
    assert err.strip().endswith("(a smaller --batch-size or --img-size needs less)") and len(err.splitlines()) == 1


def test_a_reference_that_is_not_finite_is_a_failure_not_bitwise_equal():
    nan = torch.tensor([float("nan"), 1.0])
    check = compare_tensors("modes", "c", "efficient", "output", {"output": nan.clone()}, {"output": nan}, 1e-6)
    assert not check.passed and "output: plain's is not finite" in check.detail and "bitwise" not in check.detail


def test_a_non_finite_derivative_fails_the_directional_check(monkeypatch):
    # max() drops a NaN: the random-direction check passed with a rel of 0 on a model that computes NaN.
    monkeypatch.setattr(BatchNormAct, "forward", lambda norm, *maps, cache=None: float("nan") * F.batch_norm(
        torch.cat(maps, 1), None, None, norm.weight, norm.bias, True, 0.0, norm.eps))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        checks = autograd_gradcheck("plain", spatial_dims=1)
    finally:
        torch.set_num_threads(threads)
    directional = checks[1]
    assert directional.what == "random-direction derivative vs central differences"
    assert not directional.passed and directional.max_rel == math.inf
