"""tools/bench.py and effidense.benchmark on tiny models, CPU only (timings are never asserted)."""
from __future__ import annotations

import json
import re
import shlex
import statistics
import sys

import pytest
import torch
from conftest import load_tool

from effidense.benchmark import BenchConfig
from effidense.harness import build_variant, largest_batch, parse_variants, peer_unsupported
from effidense.modelspec import resolve_model

TINY = ["--model", "custom", "--growth-rate", "4", "--block-config", "2,2", "--num-init-features", "8",
        "--num-classes", "5", "--img-size", "32", "--batch-size", "4", "--warmup", "1", "--steps", "2",
        "--threads", "1", "--quiet"]
TINY_SMALL = ["--model", "custom", "--growth-rate", "4", "--block-config", "1,1", "--num-init-features", "8",
              "--num-classes", "3", "--small-inputs", "--img-size", "8", "--batch-size", "2", "--warmup", "0",
              "--steps", "1", "--threads", "1", "--quiet"]
# What dynamo traces for the tests that compile: one dense block of one layer, traced in half the time of two
TINY_COMPILED = [*TINY_SMALL[:5], "1", *TINY_SMALL[6:]]


@pytest.fixture(scope="module")
def bench():
    return load_tool("bench")


@pytest.fixture(scope="module")
def tiny_run(bench, tmp_path_factory):
    """One run of every variant, with JSON and plot; shared by the tests that read its outputs."""
    out = tmp_path_factory.mktemp("bench")
    json_path, plot_path = out / "bench.json", out / "bench.png"
    argv = TINY + ["--variants", "plain,efficient,frugal,tv,timm", "--json", str(json_path), "--plot", str(plot_path),
                   "--plot-scales", "0.5,1,2"]
    return argv, json_path, plot_path


def run_main(module, argv, capsys):
    code = module.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_table_json_and_plot(bench, tiny_run, capsys):
    argv, json_path, plot_path = tiny_run
    code, out, _ = run_main(bench, argv, capsys)
    assert code == 0, out

    # The markdown table: header row, separator, one row per variant.
    lines = [line for line in out.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:9] == ["variant", "forward ms", "backward ms", "R=B/F", "step ms", "step vs plain", "images/s",
                          "activation MiB", "x less"]
    assert "peak MiB" not in header  # CUDA only
    rows = {r.strip("|").split("|")[0].strip(): [c.strip() for c in r.strip("|").split("|")] for r in lines[2:]}
    assert list(rows) == ["plain", "efficient", "frugal", "tv", "timm"]
    assert rows["plain"][header.index("x less")] == "1.00x"
    assert all(float(rows[v][header.index("step ms")]) > 0 for v in rows)

    data = json.loads(json_path.read_text())
    assert data["schema"] == "effidense.bench/1"
    env = data["environment"]
    for key in ("torch", "torchvision", "timm", "device_name", "cpu_count", "date", "command", "python"):
        assert env[key], key
    assert env["torch"] == torch.__version__ and env["torch_threads"] == 1
    # recorded, not rebuilt: this process's real command line (here pytest's), the arguments bench parsed, the launcher
    assert env["command"] == shlex.join(sys.orig_argv) and env["launcher"] == "python"
    assert env["argv"] == argv and "torchrun" not in env
    assert data["config"]["model"]["kwargs"]["block_config"] == [2, 2]
    assert data["config"]["batch_size"] == 4 and data["config"]["steps"] == 2
    results = {r["variant"]: r for r in data["results"]}
    for name, r in results.items():
        assert r["status"] == "ok", (name, r["error"])
        assert len(r["samples"]["forward_ms"]) == 2 and len(r["samples"]["backward_ms"]) == 2
        assert r["step_ms"] > 0 and r["images_per_s"] > 0
        assert r["ratio_b_f"] == pytest.approx(r["backward_ms"] / r["forward_ms"])
        assert r["same_function_rel_diff"] <= 1e-5  # peers loaded with our weights compute the same function
        assert r["peak_bytes"] is None and r["compile_s"] is None and r["max_batch"] is None
    act = {name: r["activation_bytes"] for name, r in results.items()}
    assert act["frugal"] < act["efficient"] < act["plain"]
    assert act["tv"] == act["timm"] < act["plain"]
    assert results["efficient"]["activation_x_less"] == pytest.approx(act["plain"] / act["efficient"])
    # Variants take turns, so ratios are taken round by round.
    pairs = zip(results["efficient"]["samples"]["step_ms"], results["plain"]["samples"]["step_ms"], strict=True)
    assert results["efficient"]["step_vs_plain"] == pytest.approx(statistics.median(e / p for e, p in pairs))
    # The floor: frugal keeps essentially only it; nothing keeps less.
    assert 0 < data["floor_bytes"] <= act["frugal"] <= 1.1 * data["floor_bytes"]
    assert f"floor: {data['floor_bytes'] / 2**20:.1f} MiB" in out

    sweep = data["depth_sweep"]
    assert sweep["errors"] == []
    assert sweep["block_configs"] == [[1, 1], [2, 2], [4, 4]]
    assert sweep["depths"] == [7, 11, 19]
    plain, efficient, frugal = (sweep["activation_bytes"][m] for m in ("plain", "efficient", "frugal"))
    assert plain == sorted(plain) and all(f < e < p for f, e, p in zip(frugal, efficient, plain, strict=True))
    assert sweep["activation_bytes"]["plain"][1] == act["plain"]  # the sweep uses the same meter and batch
    # The peers are on the memory-vs-depth panel too (the figure's point is the gap to them).
    assert sweep["skipped"] == {} and sweep["activation_bytes"]["tv"] == sweep["activation_bytes"]["timm"]
    assert all(f < t for f, t in zip(frugal, sweep["activation_bytes"]["tv"], strict=True))
    assert sweep["activation_bytes"]["tv"][-1] < plain[-1]

    png = plot_path.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def test_existing_outputs_need_force(bench, tmp_path, capsys):
    existing = tmp_path / "out.json"
    existing.write_text("keep me")
    with pytest.raises(SystemExit) as exc:
        bench.main(TINY + ["--json", str(existing)])
    assert exc.value.code == 2
    assert "--force" in capsys.readouterr().err
    assert existing.read_text() == "keep me"


def test_compile_variant(bench, tmp_path, capsys, monkeypatch):
    """A compiled variant is timed beside its eager self (which it brings along), with its compile time and a line
    saying whether compiling pays. Each compiled variant compiles cold: the second reuses nothing the first traced
    (it once showed 0.0 s), and the first, whose graphs that drops, still runs its rounds. aot_eager: the same path
    as inductor through the bench, in seconds."""
    import torch._functorch.config
    import torch._inductor.config

    import effidense.benchmark.runner as runner

    aot_eager, caches = torch._dynamo.lookup_backend("aot_eager"), []

    def backend(graph, inputs):  # what a compile could reuse from disk
        caches.append((torch._inductor.config.fx_graph_cache, torch._functorch.config.enable_autograd_cache))
        return aot_eager(graph, inputs)

    real_compile = torch.compile
    monkeypatch.setattr(runner.torch, "compile", lambda model, **kwargs: real_compile(model, backend=backend))
    json_path = tmp_path / "compiled.json"
    code, out, _ = run_main(bench, TINY_COMPILED + ["--variants", "efficient+compile,plain+compile",
                                                    "--json", str(json_path)], capsys)
    assert code == 0, out
    assert "+compile: the whole model (torch.compile mode 'default')" in out
    header = next(line for line in out.splitlines() if line.startswith("| variant"))
    assert "vs eager" in header and "compile s" in header
    data = json.loads(json_path.read_text())
    results = {r["variant"]: r for r in data["results"]}
    assert list(results) == ["efficient", "efficient+compile", "plain", "plain+compile"]
    for mode in ("efficient", "plain"):
        compiled = results[f"{mode}+compile"]
        assert compiled["status"] == "ok", compiled["error"]
        assert compiled["compile_s"] > 0 and len(compiled["samples"]["step_ms"]) == 1  # its round ran
        assert compiled["activation_bytes"] > 0 and compiled["vs_eager"] > 0
        assert results[mode]["compile_s"] is None and results[mode]["vs_eager"] is None
    assert caches.count((False, False)) >= 2  # each variant's timed first step: no on-disk cache
    assert len(data["compile_verdicts"]) == 2 and all(v in out for v in data["compile_verdicts"])
    assert data["compile_verdicts"][0].startswith("compiled efficient is ")


def _fake_timing(monkeypatch, compiled_ms: float) -> None:
    """Steps of 10 ms eager and ``compiled_ms`` compiled (forward and backward halves), compiled with aot_eager (no
    inductor: seconds): the verdict then depends on these numbers alone."""
    import effidense.benchmark.runner as runner
    from effidense.benchmark import StepRunner

    real_compile = torch.compile
    monkeypatch.setattr(runner.torch, "compile", lambda model, **kwargs: real_compile(model, backend="aot_eager"))

    def timed_step(self, timer):
        ms = compiled_ms if isinstance(self.model, torch._dynamo.eval_frame.OptimizedModule) else 10.0
        return ms / 2, ms / 2

    monkeypatch.setattr(StepRunner, "timed_step", timed_step)


# what the partitioner's choice adds to a verdict where a compiled mode keeps more than its eager self (see below)
KEEPS_MORE = r"(; but it keeps \d+\.\dx the memory eager \w+ keeps)?"


def test_compile_that_does_not_pay_says_so(bench, capsys, monkeypatch):
    _fake_timing(monkeypatch, compiled_ms=13.0)
    code, out, _ = run_main(bench, TINY_COMPILED + ["--variants", "frugal", "--compile", "--steps", "3"], capsys)
    assert code == 0, out
    assert re.search(r"^compiled frugal is 1\.30x slower than eager on cpu \(step\) after a \d+(\.\d)? s compile"
                     rf"{KEEPS_MORE}: don't compile on this device$", out, re.MULTILINE), out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| frugal")}
    assert "1.30x" in rows["frugal+compile"]


def test_compile_that_pays_says_how_much(bench, capsys, monkeypatch):
    _fake_timing(monkeypatch, compiled_ms=8.0)
    code, out, _ = run_main(bench, TINY_COMPILED + ["--variants", "efficient+compile"], capsys)
    assert code == 0, out
    assert re.search(r"^compiled efficient is 1\.25x faster than eager on cpu \(step\) after a \d+(\.\d)? s "
                     rf"compile{KEEPS_MORE}$", out, re.MULTILINE), out
    assert "don't compile" not in out


def test_compile_mode_reaches_torch_compile(bench, capsys, monkeypatch):
    """Effidense models and peers alike: torch.compile of the whole model (outside DDP) with the mode asked for."""
    import effidense.benchmark.runner as runner
    from effidense import DenseNet

    calls = []
    monkeypatch.setattr(runner.torch, "compile", lambda model, **kwargs: calls.append((type(model), kwargs)) or model)
    code, out, _ = run_main(bench, TINY_SMALL + ["--variants", "efficient+compile", "--compile-mode",
                                                 "reduce-overhead"], capsys)
    assert code == 0, out
    assert calls == [(DenseNet, {"dynamic": False, "mode": "reduce-overhead"})]
    assert "+compile: the whole model (torch.compile mode 'reduce-overhead')" in out


def test_compile_scope_is_gone(bench, capsys):
    code, _, err = run_cli(bench, TINY_SMALL + ["--variants", "efficient+compile", "--compile-scope", "layers"],
                           capsys)
    assert code == 2 and "unrecognized arguments: --compile-scope" in err


def test_compile_mode_is_checked(bench, capsys):
    code, _, err = run_cli(bench, TINY_SMALL + ["--variants", "efficient+compile", "--compile-mode", "fast"], capsys)
    assert code == 2
    assert "--compile-mode: invalid choice: 'fast'" in err


def test_peers_without_counterpart_are_skipped(bench, capsys):
    code, out, _ = run_main(bench, TINY_SMALL + ["--variants", "plain,tv,timm"], capsys)
    assert code == 0
    assert "| tv" in out and "SKIPPED: torchvision cannot build custom: it has no small-input (CIFAR) stem" in out
    assert "SKIPPED: timm cannot build" in out


def test_default_variants_include_only_exact_peers(bench, capsys, tmp_path):
    json_path = tmp_path / "default.json"
    code, _, _ = run_main(bench, TINY_SMALL + ["--json", str(json_path)], capsys)
    assert code == 0
    assert [r["variant"] for r in json.loads(json_path.read_text())["results"]] == ["plain", "efficient", "frugal"]


def test_failing_variant_is_reported_and_others_run(bench, capsys, monkeypatch):
    import effidense.benchmark.runner as runner

    real = runner.build_variant

    def broken(variant, spec):
        if variant == "efficient":
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(variant, spec)

    monkeypatch.setattr(runner, "build_variant", broken)
    code, out, _ = run_main(bench, TINY_SMALL + ["--variants", "plain,efficient,frugal"], capsys)
    assert code == 0
    assert "FAILED: out of memory: CUDA out of memory. Tried to allocate 2.00 GiB" in out
    assert "| frugal" in out and "| plain" in out


def test_all_variants_failing_exits_nonzero(bench, capsys):
    code, out, err = run_main(bench, TINY_SMALL + ["--variants", "tv"], capsys)
    assert code == 1
    assert "SKIPPED" in out and "no variant ran successfully" in err


@pytest.mark.parametrize("argv, message", [
    (["--growth-rate", "0"], "growth_rate must be a positive integer"),
    (["--variants", "plain,fast"], "unknown variant 'fast'"),
    (["--model", "resnet50"], "unknown model 'resnet50'"),
    (["--max-batch"], "--max-batch searches GPU memory and needs --device cuda"),
    (["--model-kwargs", "memory=frugal"], "memory cannot be set in a model config"),
])
def test_bad_arguments(bench, capsys, argv, message):
    code, _, err = run_main(bench, TINY_SMALL + argv, capsys)
    assert code == 2
    assert message in err


@pytest.mark.slow
def test_ddp_two_gloo_processes(bench, tmp_path, capsys):
    json_path = tmp_path / "ddp.json"
    code, out, _ = run_main(bench, TINY_SMALL + ["--variants", "plain,frugal", "--gpus", "2", "--json",
                                                 str(json_path)], capsys)
    assert code == 0, out
    assert "2 DDP ranks" in out
    data = json.loads(json_path.read_text())
    assert data["world_size"] == 2
    for r in data["results"]:
        assert r["status"] == "ok", r["error"]
        assert len(r["per_rank"]) == 2
        # Aggregate throughput: both ranks' images over the slowest rank's step.
        assert r["images_per_s"] == pytest.approx(2 * 2 / (r["step_ms"] / 1000))
        assert r["activation_bytes"] == max(p["activation_bytes"] for p in r["per_rank"])


def test_largest_batch_search():
    calls = []

    def fits_up_to(limit):
        def fits(batch):
            calls.append(batch)
            return batch <= limit
        return fits

    assert largest_batch(fits_up_to(37), start=8, limit=1 << 16) == 37
    assert calls[:4] == [8, 16, 32, 64]  # doubling, then bisection
    assert len(calls) <= 2 * 4 + 2
    assert largest_batch(fits_up_to(5), start=8, limit=1024) == 5  # start too big: bisect below it
    assert largest_batch(fits_up_to(0), start=8, limit=1024) == 0
    assert largest_batch(fits_up_to(10_000), start=8, limit=100) == 100
    assert largest_batch(fits_up_to(64), start=1, limit=1 << 16) == 64
    with pytest.raises(ValueError):
        largest_batch(fits_up_to(3), start=0, limit=10)


def test_peer_counterparts():
    for name in ("effi_densenet121", "effi_densenet161", "effi_densenet169", "effi_densenet201", "densenet264"):
        spec = resolve_model(name)
        assert peer_unsupported(spec, "tv") is None and peer_unsupported(spec, "timm") is None
    cifar = resolve_model("effi_densenet_bc100_k12")
    assert "small-input" in peer_unsupported(cifar, "tv") and "small-input" in peer_unsupported(cifar, "timm")
    no_bottleneck = resolve_model("densenet40_k12")
    assert "bottleneck" in peer_unsupported(no_bottleneck, "timm")
    odd_stem = resolve_model("custom", {"growth_rate": 4, "block_config": (1, 1), "num_init_features": 12})
    assert peer_unsupported(odd_stem, "tv") is None
    assert "2 * growth_rate" in peer_unsupported(odd_stem, "timm")
    with pytest.raises(ValueError, match="cannot build"):
        build_variant("timm", odd_stem)
    volumetric = resolve_model("custom", {"growth_rate": 4, "block_config": (1, 1), "num_init_features": 8,
                                          "spatial_dims": 3})
    for peer in ("tv", "tv-plain", "timm"):  # 2D-only peers: no silent 2D stand-in for a 3D net
        assert "2D only (spatial_dims=3)" in peer_unsupported(volumetric, peer)


def test_peer_models_load_our_weights():
    spec = resolve_model("custom", {"growth_rate": 4, "block_config": (2, 1), "num_init_features": 8,
                                    "num_classes": 3})
    torch.manual_seed(0)
    ours = build_variant("plain", spec).eval()
    x = torch.randn(2, 3, 32, 32)
    for peer in ("tv", "timm"):
        model = build_variant(peer, spec)
        model.load_state_dict(ours.state_dict())  # strict: same keys and shapes
        torch.testing.assert_close(model.eval()(x), ours(x))


def test_parse_variants():
    assert parse_variants("plain, efficient,plain") == ["plain", "efficient"]
    assert parse_variants("plain,tv", compile_all=True) == ["plain", "tv", "plain+compile"]
    assert parse_variants("tv+compile") == ["tv", "tv+compile"]  # a compiled variant brings its eager self
    assert parse_variants("efficient+compile,plain,efficient") == ["efficient", "efficient+compile", "plain"]
    with pytest.raises(ValueError, match="no variants"):
        parse_variants(" , ")
    with pytest.raises(ValueError, match="unknown variant 'reference'"):
        parse_variants("reference")
    assert parse_variants("reference+compile,plain", offered=["plain", "reference"]) == [
        "reference", "reference+compile", "plain"]


def test_config_validation():
    spec = resolve_model("densenet_bc100_k12")
    with pytest.raises(ValueError, match="batch_size"):
        BenchConfig(spec, ["plain"], batch_size=0)
    with pytest.raises(ValueError, match="amp"):
        BenchConfig(spec, ["plain"], amp="fp8")
    with pytest.raises(ValueError, match=r"img_size \[8, 8, 8\] is a 3D input but the model is 2D"):
        BenchConfig(spec, ["plain"], img_size=(8, 8, 8))
    with pytest.raises(ValueError, match="img_size must be at least 1"):
        BenchConfig(spec, ["plain"], img_size=(8, 0))
    with pytest.raises(ValueError, match="builders must offer 'plain'"):
        BenchConfig(spec, ["frugal"], builders={"frugal": lambda: spec.build("frugal")})


@pytest.mark.parametrize("size, shown", [(["12", "8"], "batch 2, 12x8,"), (["8", "8", "6"], "batch 2, 8x8x6,")])
def test_img_size_takes_the_inputs_own_size(bench, capsys, size, shown):
    """Two or three numbers are the input's size: a non-square image, or a volume that makes the model 3D."""
    code, out, err = run_main(bench, TINY_SMALL + ["--img-size", *size, "--variants", "plain"], capsys)
    assert code == 0, err
    assert shown in out and "| plain" in out and "FAILED" not in out


def test_max_batch_probe_treats_only_oom_as_not_fitting(monkeypatch):
    # The GPU probe's logic, on the CPU: out-of-memory means "does not fit", any other error propagates.
    from torch import nn

    import effidense.benchmark as benchmark
    from effidense.benchmark import cuda
    from effidense.progress import Progress

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    seen = []

    class FakeTrainer:
        model = nn.Linear(1, 1)

        def step(self, x, y):
            seen.append((tuple(x.shape), x.is_contiguous(memory_format=torch.channels_last)))
            if len(x) > 24:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
            if len(x) == 13:
                raise RuntimeError("cuDNN error: CUDNN_STATUS_BAD_PARAM")

    progress = Progress(1, "bench", "step", enabled=False)
    fits = cuda.cuda_fits(FakeTrainer(), torch.zeros(2, 3, 8, 8), 10, True, progress)
    assert largest_batch(fits, 4, 1024) == 24
    assert seen[0] == ((4, 3, 8, 8), True)
    with pytest.raises(RuntimeError, match="CUDNN_STATUS_BAD_PARAM"):
        fits(13)
    assert benchmark.is_oom(RuntimeError("CUDA error: out of memory"))
    assert not benchmark.is_oom(ValueError("out of range"))


def test_variants_take_turns_and_a_failing_step_drops_only_its_variant(bench, capsys, monkeypatch):
    from effidense.benchmark import timing as trainer

    order, real = [], trainer.StepRunner.timed_step

    def recording(self, timer):
        name = self.model.memory  # each variant here is one of our memory modes
        order.append(name)
        if name == "frugal" and order.count("frugal") == 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return real(self, timer)

    monkeypatch.setattr(trainer.StepRunner, "timed_step", recording)
    argv = TINY_SMALL + ["--steps", "3", "--variants", "plain,efficient,frugal"]  # the last --steps counts
    code, out, _ = run_main(bench, argv, capsys)
    assert code == 0
    assert order == ["plain", "efficient", "frugal", "plain", "efficient", "frugal", "plain", "efficient"]
    assert "FAILED: out of memory" in out and "| efficient" in out


def run_cli(module, argv, capsys):
    """main(argv) -> (exit code, stdout, stderr), whether it returns or argparse exits."""
    try:
        code = module.main(argv)
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_host_time_for_every_variant_against_torchvision_plain(bench, tmp_path, capsys, monkeypatch):
    from effidense.benchmark import timing as trainer

    calls, real = [], trainer.StepRunner.timed_host_step

    def counting(self, timer):
        calls.append(tuple(self.host_batch[0].shape))
        return real(self, timer)

    monkeypatch.setattr(trainer.StepRunner, "timed_host_step", counting)
    json_path = tmp_path / "host.json"
    variants = "plain,efficient,frugal,tv,timm,tv-plain"
    code, out, _ = run_main(bench, TINY + ["--variants", variants, "--json", str(json_path)], capsys)
    assert code == 0, out
    assert calls == [(2, 3, 32, 32)] * (2 * 6)  # one host step per variant per round, at batch 2, 3x32x32
    data = json.loads(json_path.read_text())
    assert data["host_reference"] == "tv-plain"
    assert data["host_input"] == {"batch_size": 2, "img_size": 32}
    results = {r["variant"]: r for r in data["results"]}
    assert list(results) == variants.split(",")
    reference = results["tv-plain"]["samples"]["host_ms"]
    for name, r in results.items():
        assert r["status"] == "ok", (name, r["error"])
        assert len(r["samples"]["host_ms"]) == 2 and r["host_ms"] == statistics.median(r["samples"]["host_ms"])
        pairs = zip(r["samples"]["host_ms"], reference, strict=True)
        assert r["host_vs_ref"] == pytest.approx(statistics.median(a / b for a, b in pairs))
    assert results["tv-plain"]["host_vs_ref"] == 1.0
    assert results["plain"]["step_vs_plain"] == 1.0  # step ratios stay against our plain model
    header = [c.strip() for c in out.splitlines()[4].strip("|").split("|")]
    assert header[9:11] == ["host ms", "host vs tv-plain"]
    assert "host ms: one such step at batch 2, 32x32" in out


def test_host_only_skips_full_size_steps(bench, tmp_path, capsys, monkeypatch):
    from effidense.benchmark import timing as trainer

    full, host = [], []
    real_host = trainer.StepRunner.timed_host_step
    monkeypatch.setattr(trainer.StepRunner, "timed_step", lambda self, timer: full.append(1))
    monkeypatch.setattr(trainer.StepRunner, "timed_host_step",
                        lambda self, timer: host.append(1) or real_host(self, timer))
    json_path = tmp_path / "host.json"
    code, out, _ = run_main(bench, TINY_SMALL + ["--host-only", "--steps", "3", "--variants", "plain,frugal",
                                                 "--json", str(json_path)], capsys)
    assert code == 0, out
    assert full == [] and len(host) == 3 * 2
    data = json.loads(json_path.read_text())
    assert data["host_reference"] == "plain"  # torchvision cannot build a CIFAR net
    for r in data["results"]:
        assert r["step_ms"] is None and r["activation_bytes"] is None and "step_ms" not in r["samples"]
        assert len(r["samples"]["host_ms"]) == 3 and r["host_ms"] > 0
    assert "host-overhead steps only" in out


def test_host_input_is_at_least_the_models_minimum():
    from effidense.benchmark.config import host_img_size

    assert host_img_size(resolve_model("effi_densenet121")) == 32
    assert host_img_size(resolve_model("densenet_bc100_k12")) == 32
    deep = resolve_model("custom", {"growth_rate": 4, "block_config": (1,) * 6, "num_init_features": 8})
    assert host_img_size(deep) == build_variant("plain", deep).min_input_size > 32


def test_tv_plain_is_torchvision_without_checkpointing():
    spec = resolve_model("custom", {"growth_rate": 4, "block_config": (1, 1), "num_init_features": 8})
    assert build_variant("tv-plain", spec).features.denseblock1.denselayer1.memory_efficient is False
    assert build_variant("tv", spec).features.denseblock1.denselayer1.memory_efficient is True
    assert "small-input" in peer_unsupported(resolve_model("densenet_bc100_k12"), "tv-plain")


@pytest.mark.parametrize("suffix, magic", [(".pdf", b"%PDF"), (".svg", b"<svg")])
def test_plot_formats(bench, tmp_path, capsys, suffix, magic):
    path = tmp_path / f"bench{suffix}"
    code, out, err = run_main(bench, TINY_SMALL + ["--variants", "plain,frugal,tv", "--plot", str(path),
                                                   "--plot-scales", "1,2"], capsys)
    assert code == 0, out
    assert magic in path.read_bytes()[:4096]
    assert "depth sweep: tv left out: torchvision cannot build" in err  # CIFAR stem: no peer points


def _no_benchmark(monkeypatch):
    import effidense.benchmark

    def fail(*args, **kwargs):
        raise AssertionError("the benchmark ran before the error")

    monkeypatch.setattr(effidense.benchmark, "benchmark", fail)  # where the command looks it up, once parsed


def _one_line_error(code, out, err, expected):
    assert code != 0 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize("argv, message", [
    (["--plot", "bench.jpg"], "--plot: bench.jpg must end in .png, .pdf, .svg"),
    (["--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
    (["--img-size", "0"], "argument --img-size: must be at least 1, got 0"),
    (["--steps", "0"], "argument --steps: must be at least 1, got 0"),
    (["--warmup", "-1"], "argument --warmup: must be 0 or more, got -1"),
    (["--gpus", "0"], "argument --gpus/--nproc: must be at least 1, got 0"),
    (["--gpus", "-1"], "argument --gpus/--nproc: must be at least 1, got -1"),
    (["--json", "/proc/effidense-bench.json"], "--json: cannot write /proc/effidense-bench.json"),
    (["--plot", "/proc/effidense-bench.png"], "--plot: cannot write /proc/effidense-bench.png"),
    (["--json", "/nonexistent-dir/b.json"], "--json: cannot write /nonexistent-dir/b.json: directory"),
    (["--model-kwargs", "growth_rate"], "argument --model-kwargs: 'growth_rate' is not KEY=VALUE"),
    (["--model-kwargs", "block_config=(1,1"], "argument --model-kwargs: block_config: '(1,1' is not a valid"),
    (["--host-only", "--max-batch", "--device", "cpu"], "drop --max-batch"),
    (["--seed", str(2 ** 70)], f"argument --seed: must be between {-2 ** 63} and {2 ** 63 - 1}, got {2 ** 70}"),
    (["--threads", "100000000"], "argument --threads: must be at most"),
    (["--plot-scales", "inf"], "argument --plot-scales: expected positive numbers, got 'inf'"),
    (["--plot-scales", "0.5,nan"], "argument --plot-scales: expected positive numbers, got '0.5,nan'"),
    (["--batch-size", str(10 ** 17)], f"batch {10 ** 17} of 8x8 inputs is too large: the step's maps could hold up "
                                      "to"),
    (["--spatial-dims", "1", "--channels-last"], "--channels-last: a 1D input (a signal) has no channels-last"),
])
def test_bad_input_is_one_line_before_any_work(bench, capsys, monkeypatch, argv, message):
    if "--host-only" not in argv:
        _no_benchmark(monkeypatch)
    code, out, err = run_cli(bench, TINY_SMALL + argv, capsys)
    _one_line_error(code, out, err, message)


def test_device_cuda_without_gpu(bench, capsys, monkeypatch):
    _no_benchmark(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, out, err = run_cli(bench, TINY_SMALL + ["--device", "cuda"], capsys)
    _one_line_error(code, out, err, "--device cuda: torch sees no CUDA device")


def test_plot_without_matplotlib_fails_before_the_run(bench, tmp_path, capsys, monkeypatch):
    import sys

    _no_benchmark(monkeypatch)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    code, out, err = run_cli(bench, TINY_SMALL + ["--plot", str(tmp_path / "b.png")], capsys)
    _one_line_error(code, out, err, "--plot needs matplotlib: pip install 'effidense[plot]'")


def test_write_failure_after_the_run_is_one_line(bench, tmp_path, capsys, monkeypatch):
    import errno

    import effidense.benchmark.report as report

    def read_only(path, data):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(report, "atomic_write_bytes", read_only)
    path = tmp_path / "b.json"
    code, out, err = run_cli(bench, TINY_SMALL + ["--variants", "plain", "--json", str(path)], capsys)
    assert code == 1 and "| plain" in out and not path.exists()
    assert err.strip() == f"effidense bench: error: --json: cannot write {path}: [Errno 30] Read-only file system: " \
                          f"'{path}'"


def test_model_kwargs_take_timm_key_value_syntax(bench, tmp_path, capsys):
    json_path = tmp_path / "kw.json"
    argv = TINY_SMALL[:2] + ["--model-kwargs", "growth_rate=4", "block_config=(1,1)", "num_init_features=8",
                             "small_inputs=True", "num_classes=3"] + TINY_SMALL[11:]
    code, out, _ = run_main(bench, argv + ["--variants", "plain", "--json", str(json_path)], capsys)
    assert code == 0, out
    kwargs = json.loads(json_path.read_text())["config"]["model"]["kwargs"]
    assert kwargs == {"growth_rate": 4, "block_config": [1, 1], "num_init_features": 8, "small_inputs": True,
                      "num_classes": 3}


def test_depth_sweep_counts_the_meters_bytes_on_tensors_that_allocate_nothing():
    """The sweep's bytes are the meter's on real tensors, and it runs at a size whose real tensors would not fit."""
    from effidense.benchmark import memory_by_depth
    from effidense.memory import SavedTensorMeter

    spec = resolve_model("custom", dict(growth_rate=4, block_config=(2, 2), num_init_features=8, num_classes=5))
    cfg = BenchConfig(spec=spec, variants=["plain"], batch_size=4, img_size=32, progress=False)
    sweep = memory_by_depth(cfg, [0.5, 1])
    assert sweep["errors"] == []
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))
    for i, scale in enumerate((0.5, 1)):
        for mode, values in sweep["activation_bytes"].items():
            model = build_variant(mode, spec.scaled(scale)).train()
            with SavedTensorMeter(exclude=model) as meter:
                torch.nn.functional.cross_entropy(model(x).float(), y)
            assert values[i] == meter.bytes, (mode, scale)
    # Batch 2^20 at 224 px: the input alone would take 588 GiB of real memory.
    huge = memory_by_depth(BenchConfig(spec=spec, variants=["plain"], batch_size=1 << 20, img_size=224,
                                       progress=False), [1], modes=("efficient",))
    assert huge["errors"] == [] and huge["activation_bytes"]["efficient"][0] > 588 * (1 << 30)


def test_command_line_records_the_launcher_and_the_real_argv():
    from effidense.harness import command_line

    worker = ["/usr/bin/python3", "-u", "tools/bench.py", "--device", "cuda"]
    environ = {"TORCHELASTIC_RUN_ID": "abc", "LOCAL_RANK": "1", "RANK": "1", "WORLD_SIZE": "4", "PATH": "/bin"}
    record = command_line(["--device", "cuda"], environ, worker)
    assert record == {"command": "/usr/bin/python3 -u tools/bench.py --device cuda", "argv": ["--device", "cuda"],
                      "launcher": "torchrun",
                      "torchrun": {"TORCHELASTIC_RUN_ID": "abc", "LOCAL_RANK": "1", "RANK": "1", "WORLD_SIZE": "4"}}
    plain = command_line(None, {}, ["python", "-m", "effidense", "bench", "--quiet"])
    assert plain["command"] == "python -m effidense bench --quiet" and plain["launcher"] == "python"


def test_progress_off_a_terminal_is_plain_lines(bench, capsys):
    import io

    from effidense.progress import Progress

    stream = io.StringIO()  # not a terminal, as a redirected stderr
    progress = Progress(3, "bench", "step", stream=stream, interval_s=0)
    progress.describe("bench plain")
    progress.note("warm-up")
    progress.advance()
    progress.advance(2)
    progress.close()
    assert stream.getvalue() == "bench plain: 1/3 step (33%) warm-up\nbench plain: 3/3 step (100%) warm-up\n"
    # the whole command with stderr captured (no terminal): no tqdm frames, a last progress line that counts every
    # step once, a skipped variant's included
    argv = [a for a in TINY_SMALL if a != "--quiet"]
    code, _, err = run_main(bench, argv + ["--variants", "plain,efficient,tv"], capsys)
    assert code == 0 and "\r" not in err
    counts = [re.search(r"^bench \S+: (\d+)/(\d+) step \((\d+)%\)", line) for line in err.splitlines()]
    counts = [tuple(map(int, m.groups())) for m in counts if m]
    assert counts and all(n <= total for n, total, _ in counts), err
    assert counts[-1] == (counts[-1][1], counts[-1][1], 100), err


def test_volumes_with_monai_as_the_peer(bench, tmp_path, capsys):
    """--spatial-dims 3: our modes and MONAI's DenseNet (same weights, same function) on volumes; the 2D peers say
    why they are left out."""
    json_path = tmp_path / "3d.json"
    argv = TINY[:8] + ["--spatial-dims", "3", "--in-chans", "1", "--img-size", "16", "--batch-size", "2", "--steps",
                       "1", "--warmup", "0", "--quiet", "--variants", "plain,efficient,frugal,monai,tv",
                       "--json", str(json_path)]
    code, out, _ = run_main(bench, argv, capsys)
    assert code == 0, out
    assert "batch 2, 16x16x16" in out
    results = {r["variant"]: r for r in json.loads(json_path.read_text())["results"]}
    assert results["tv"]["status"] == "skipped" and "2D only" in results["tv"]["error"]
    assert results["monai"]["status"] == "ok" and results["monai"]["same_function_rel_diff"] < 1e-5
    kept = {name: results[name]["activation_bytes"] for name in ("plain", "efficient", "frugal", "monai")}
    assert kept["monai"] >= kept["plain"] > kept["efficient"] > kept["frugal"], kept


def test_a_depth_sweep_too_deep_to_build_is_refused_before_the_run(bench, capsys, monkeypatch, tmp_path):
    # The sweep runs last and built torchvision's peer with 2e300 layers (for ever) after the whole benchmark.
    _no_benchmark(monkeypatch)
    argv = TINY_SMALL + ["--plot", str(tmp_path / "b.png"), "--plot-scales", "1,1e300"]
    code, out, err = run_cli(bench, argv, capsys)
    _one_line_error(code, out, err, "--plot-scales 1e+300: block_config (1e+300, 1e+300) has 2e+300 dense layers; "
                                    "at most 10000")


def test_running_out_of_memory_before_any_variant_is_one_line(bench, capsys, monkeypatch):
    import effidense.benchmark.runner as runner

    def no_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried "
                           "to allocate 240000000000000000 bytes")

    monkeypatch.setattr(runner, "run_batch", no_memory)
    code, out, err = run_cli(bench, TINY_SMALL + ["--variants", "plain"], capsys)
    assert code == 1
    _one_line_error(code, out, err, "effidense bench: error: out of memory: [enforce fail")
    assert "(a smaller --batch-size or --img-size needs less)" in err


def test_channels_last_volumes_use_the_3d_format(bench, capsys):
    # torch.channels_last is for 4D tensors only: a 3D run with --channels-last ended in a traceback.
    argv = TINY_SMALL[:11] + ["--spatial-dims", "3", "--img-size", "8", "--batch-size", "2", "--warmup", "0",
                             "--steps", "1", "--threads", "1", "--quiet", "--channels-last",
                             "--variants", "plain,efficient"]
    code, out, err = run_cli(bench, argv, capsys)
    assert code == 0, out + err
    assert "8x8x8, fp32, channels_last" in out and "FAILED" not in out


def test_a_plain_reference_that_is_not_finite_fails_every_variant_by_name(bench, capsys, monkeypatch):
    from effidense.densenet import DenseNet

    forward = DenseNet.forward

    def nan_in_eval(model, x):  # a non-finite reference made every variant "differ by nan"
        out = forward(model, x)
        return out * float("nan") if not model.training else out

    monkeypatch.setattr(DenseNet, "forward", nan_in_eval)
    code, out, err = run_cli(bench, TINY_SMALL + ["--variants", "plain,efficient"], capsys)
    assert code == 1
    assert out.count("the plain model's eval output is not finite (NaN or inf): nothing to check against") == 2, out


def test_a_compiled_mode_that_keeps_more_than_its_eager_self_says_so():
    """The partitioner decides what a compiled graph keeps: a verdict that only spoke of speed would hide a mode that
    lost its memory savings."""
    from types import SimpleNamespace

    from effidense.benchmark import compile_verdicts

    def result(variant, kept, vs_eager=None, compile_s=None):
        return SimpleNamespace(ok=True, variant=variant, activation_bytes=kept, vs_eager=vs_eager, compile_s=compile_s)

    report = SimpleNamespace(config=SimpleNamespace(host_only=False, device="cpu"), results=[
        result("efficient", 100), result("efficient+compile", 630, vs_eager=0.8, compile_s=119.4),
        result("frugal", 100), result("frugal+compile", 105, vs_eager=1.3, compile_s=12.0)])
    assert compile_verdicts(report) == [
        "compiled efficient is 1.25x faster than eager on cpu (step) after a 119 s compile; but it keeps 6.3x the "
        "memory eager efficient keeps",
        "compiled frugal is 1.30x slower than eager on cpu (step) after a 12 s compile: don't compile on this device"]


def test_the_default_run_is_quick_and_full_is_the_whole_matrix(bench, monkeypatch):
    """Without flags: DenseNet-121, small enough for a CPU in a couple of minutes, our modes beside every peer that
    builds it; --full: the model's own input size, a training batch, more rounds and compiled copies of our modes;
    flags given alongside win. Only the configuration is checked: the benchmark itself does not run."""
    import effidense.benchmark

    runs = []
    monkeypatch.setattr(effidense.benchmark, "benchmark", lambda cfg, **kwargs: runs.append(cfg))  # None: no report
    dn121 = resolve_model("densenet121")
    peers = [p for p in ("tv", "timm", "tv-plain", "monai") if peer_unsupported(dn121, p) is None]
    for argv in ([], ["--full"], ["--full", "--batch-size", "8", "--variants", "plain"],
                 ["--model", "effi_densenet_bc100_k12"]):
        assert bench.main([*argv, "--quiet"]) == 0
    quick, full, chosen, cifar = [(cfg.spec.name, cfg.img_size, cfg.batch_size, cfg.steps, cfg.variants)
                                  for cfg in runs]
    modes = ["plain", "efficient", "frugal"]
    assert quick == ("effi_densenet121", 64, 8, 3, [*modes, *peers]) and {"tv", "timm", "tv-plain"} <= set(peers)
    assert full[:4] == ("effi_densenet121", 224, 64, 5)
    assert full[4] == [*modes, *peers, *(f"{m}+compile" for m in modes)]
    assert chosen[1:] == (224, 8, 5, ["plain", "plain+compile"])
    assert cifar == ("effi_densenet_bc100_k12", 32, 8, 3, modes)  # no peer builds the CIFAR stem
