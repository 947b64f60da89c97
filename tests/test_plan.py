"""effidense.planner / ``effidense plan``: predictions on fake tensors, checked against real steps at small sizes."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, load_tool, one_line_error
from torch import nn
from torch.utils.checkpoint import checkpoint

from effidense import DenseNet
from effidense.harness import StepProbe, StepSpec, build_variant, monai_variants, torch_threads
from effidense.memory import SavedTensorMeter, StorageTracker
from effidense.modelspec import ModelSpec
from effidense.planner import (
    DEFAULT_MARGINS,
    GPU_PRESETS,
    JSON_SCHEMA,
    parse_budget,
    plan,
    recommendation,
    search_batch,
    search_edge,
)

SPEC = ModelSpec("tiny", TINY)
VARIANTS = ("plain", "efficient", "frugal", "tv", "tv-plain", "timm")
# Small DenseNets whose channels are multiples of 16, as a DenseNet-121's are (oneDNN pads other counts)
SMALL = ModelSpec("small", dict(growth_rate=16, block_config=(2, 2), num_init_features=32, num_classes=5))
SMALL_3D = ModelSpec("small 3D", dict(growth_rate=16, block_config=(2, 2), num_init_features=32, num_classes=5,
                                      spatial_dims=3, in_chans=1))
CLI_TINY = ["--model", "custom", "--growth-rate", "4", "--block-config", "2,2", "--num-init-features", "8",
            "--num-classes", "5", "--img-size", "32", "--batch-size", "4", "--quiet"]


@pytest.fixture(scope="module")
def cli():
    return load_tool("plan")


def run(cli, argv):
    """main(argv)'s exit code, whether it returns or argparse exits."""
    try:
        return cli.main(argv)
    except SystemExit as exc:
        return exc.code


def test_tracker_counts_each_storage_once_until_freed():
    with StorageTracker() as tracker:
        a = torch.empty(1000)  # 4000 bytes
        view = a.view(10, 100)  # same storage
        a.add_(1)  # in place: same storage
        b = torch.empty(500, dtype=torch.float64)  # 4000 bytes
        assert tracker.current == 8000
        del a
        assert tracker.current == 8000  # the view keeps the storage alive
        del view
        assert tracker.current == 4000
        c = torch.empty(100)
    assert tracker.peak == 8000
    assert tracker.at_peak()["transient"] == 8000
    del b, c


def test_tracker_sees_checkpoint_recomputation_in_backward():
    lin = nn.Linear(64, 64)
    x = torch.randn(32, 64, requires_grad=True)

    def f(t):
        return torch.relu(lin(t)).sum()

    made_in_backward = []
    for run in (f, lambda t: checkpoint(f, t, use_reentrant=False)):
        with StorageTracker() as tracker:
            loss = run(x)
            before = tracker.count
            loss.backward()
            made_in_backward.append(tracker.count - before)
    # The checkpoint rebuilds the linear layer's output and the ReLU's (and their bookkeeping) in backward.
    assert made_in_backward[1] - made_in_backward[0] >= 2


@pytest.mark.parametrize("amp, optimizer", [(None, "adamw"), ("bf16", "sgd-momentum")])
def test_prediction_is_within_5_percent_of_a_real_step(amp, optimizer):
    """The same tracker on real tensors: every memory mode and every peer, the peak and the largest batch."""
    kwargs = dict(img_size=32, batch_size=4, amp=amp, optimizer=optimizer, budget="3MiB", margin=0.0)
    predicted = plan(SPEC, variants=VARIANTS, **kwargs)
    real = plan(SPEC, variants=VARIANTS, fake=False, **kwargs)
    assert predicted.config["tensors"] == "fake" and real.config["tensors"] == "real"
    for p, r in zip(predicted.variants, real.variants, strict=True):
        assert p.ok and r.ok, (p.error, r.error)
        assert abs(p.peak_bytes - r.peak_bytes) <= 0.05 * r.peak_bytes, p.name
        assert abs(p.max_batch - r.max_batch) <= 0.05 * r.max_batch, p.name
        assert p.max_batch_peak_bytes <= predicted.usable_bytes
    by_name = {p.name: p for p in predicted.variants}
    assert by_name["frugal"].max_batch > by_name["plain"].max_batch


def test_saved_activations_are_the_meters_count():
    x = torch.randn(4, 3, 32, 32)
    y = torch.randint(0, TINY["num_classes"], (4,))
    predicted = {r.name: r for r in plan(SPEC, variants=VARIANTS, img_size=32, batch_size=4).variants}
    for name in VARIANTS:
        model = build_variant(name, SPEC).train()
        with SavedTensorMeter(exclude=model) as meter:
            F.cross_entropy(model(x), y)
        assert predicted[name].saved_activation_bytes == meter.bytes, name


def test_breakdown_sums_to_the_peak_and_optimizer_state_is_counted():
    sgd, momentum, adamw = (plan(SPEC, variants="efficient", img_size=32, batch_size=4, optimizer=o).variants[0]
                            for o in ("sgd", "sgd-momentum", "adamw"))
    params = sum(p.numel() * 4 for p in SPEC.build().parameters())
    assert sgd.optimizer_state_bytes == 0
    assert momentum.optimizer_state_bytes == params
    assert adamw.optimizer_state_bytes >= 2 * params  # exp_avg, exp_avg_sq (and a step count per parameter)
    assert sgd.gradient_bytes == params
    for r in (sgd, momentum, adamw):
        assert sum(r.at_peak.values()) == r.peak_bytes
    assert adamw.peak_bytes > momentum.peak_bytes > sgd.peak_bytes


def test_fake_steps_allocate_nothing():
    # A real input of this size alone would need 576 GiB.
    r = plan(SPEC, variants="efficient", img_size=224, batch_size=1 << 20).variants[0]
    assert r.ok, r.error
    assert r.peak_bytes > 576 * (1 << 30)


def test_search_batch_on_affine_and_convex_peaks():
    calls = []

    def affine(n):
        calls.append(n)
        return 1000 + 37 * n

    assert search_batch(affine, 10_000, [4, 8], 1 << 20) == (10_000 - 1000) // 37
    assert len(set(calls)) == 3  # two to fit the line, one to confirm

    def convex(n):  # the peak moves to a steeper moment at larger batches
        return max(1000 + 10 * n, 50 * n - 2000)

    for usable in (900, 1000, 1010, 5000, 20_000, 123_457):
        brute = max((n for n in range(0, 10_000) if n == 0 or convex(n) <= usable), default=0)
        assert search_batch(convex, usable, [3, 6], 1 << 20) == brute, usable
    assert search_batch(lambda n: 5 * n, 1 << 40, [1, 2], 1000) == 1000  # the limit


def test_search_batch_steps_up_from_a_guess_that_fits_with_the_batch_above():
    """Where the peak grows more slowly past the batches it was measured at (a frugal step's slices grow with the
    batch), the answer and the batch above it can both fit: the search steps up from there in doubling steps rather
    than bisect from the limit, so it never measures a batch far beyond the answer."""
    for usable in (107_000, 150_000):
        calls = []

        def kinked(n, calls=calls):
            calls.append(n)
            return 1000 * n if n <= 100 else 100_000 + 700 * (n - 100)

        brute = max(n for n in range(10_000) if kinked(n) <= usable)
        calls.clear()
        assert search_batch(kinked, usable, [4, 8], 1 << 24, exact=True) == brute
        assert max(calls) <= 2 * brute and len(calls) <= 12


def test_search_edge_respects_the_minimum():
    def peak(edge):
        return 100 + 2 * edge ** 3

    for usable in (2000, 10_000, 10 ** 6):
        brute = max(e for e in range(7, 1000) if peak(e) <= usable)
        assert search_edge(peak, usable, (16, 16, 16), peak(16), 100, 7, 4096) == brute
    assert search_edge(peak, 100 + 2 * 7 ** 3 - 1, (16, 16, 16), peak(16), 100, 7, 4096) is None


def test_search_edge_finds_the_largest_edge_where_the_peak_jumps():
    """Peaks that grow with the volume, with a jump somewhere (a step that changes with the input's size): the answer
    is brute force's, in a few steps."""
    import random

    rng = random.Random(0)
    steps = []
    for _ in range(300):
        dims, static, k = rng.choice([2, 3]), rng.randint(0, 10 ** 6), rng.uniform(0.5, 100)
        at, jump, per_edge = rng.randint(5, 1500), rng.choice([0, 1, 100]) * rng.randint(0, 10 ** 5), rng.randint(0, 50)

        def peak(e, dims=dims, static=static, k=k, at=at, jump=jump, per_edge=per_edge):
            return static + int(k * e ** dims) + (jump if e >= at else 0) + e * per_edge

        size, min_edge = (rng.randint(4, 64),) * dims, 3
        usable = rng.randint(static + 1, static + int(k * 2000 ** dims))
        measured = []
        got = search_edge(lambda e, peak=peak, measured=measured: measured.append(e) or peak(e), usable, size,
                          peak(size[0]), static, min_edge, 2048)
        fits = [e for e in range(min_edge, 2049) if peak(e) <= usable]
        assert got == (max(fits) if fits else None)
        steps.append(len(measured))
    assert sum(steps) / len(steps) < 4


def _stand_in_3d() -> nn.Module:
    """A tiny 3D network with a checkpointed segment, standing in for a 3D DenseNet."""
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU())
            self.body = nn.Sequential(nn.Conv3d(4, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU())
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            x = self.stem(x)
            x = checkpoint(self.body, x, use_reentrant=False)
            return self.head(torch.flatten(nn.functional.adaptive_avg_pool3d(x, 1), 1))

    return Net()


def test_3d_input_searches_the_largest_cube_edge():
    kwargs = dict(img_size=(6, 6, 6), batch_size=2, in_chans=2, num_classes=3, min_size=4, budget="400KiB")
    predicted = plan({"net": _stand_in_3d}, **kwargs)
    r = predicted.variants[0]
    assert r.ok, r.error
    assert predicted.config["max_edge"] is True and r.max_edge is not None
    probe = StepProbe(_stand_in_3d, StepSpec(in_chans=2, num_classes=3))
    usable = predicted.usable_bytes
    assert probe.measure(2, (r.max_edge,) * 3).peak_bytes <= usable < probe.measure(2, (r.max_edge + 1,) * 3).peak_bytes
    real = plan({"net": _stand_in_3d}, fake=False, **{**kwargs, "budget": None}).variants[0]
    assert abs(r.peak_bytes - real.peak_bytes) <= 0.05 * real.peak_bytes
    with pytest.raises(ValueError, match="too small"):
        plan({"net": _stand_in_3d}, **{**kwargs, "img_size": (3, 6, 6)})


def test_budget_parsing():
    assert parse_budget("24GiB") == 24 << 30
    assert parse_budget("80GB") == parse_budget("80gb") == 80 << 30  # binary, as GPUs are labelled
    assert parse_budget("512 MB") == 512 << 20
    assert parse_budget("12e9") == 12 * 10 ** 9
    assert parse_budget("1.5 MiB") == 3 << 19
    assert parse_budget("h100-80gb") == GPU_PRESETS["h100-80gb"] == 80 << 30
    assert parse_budget("12gb") == 12 << 30
    for bad in ("h100", "24 parsecs", "", "-3GB", "0"):
        with pytest.raises(ValueError):
            parse_budget(bad)
    # Past 2**63 bytes a budget is no machine's; 1e400 is inf, which int() cannot take (a traceback).
    for bad in ("1e400", "1e30GiB", float("inf"), 2 ** 70):
        with pytest.raises(ValueError, match="more bytes than a 64-bit machine addresses"):
            parse_budget(bad)
    with pytest.raises(ValueError, match="budget must be a number of bytes, got nan"):
        parse_budget(float("nan"))


def test_command_table_json_and_plot(cli, tmp_path, capsys):
    json_path, plot_path = tmp_path / "plan.json", tmp_path / "plan.png"
    assert run(cli, CLI_TINY + ["--budget", "2MiB", "--optimizer", "adamw", "--json", str(json_path),
                                "--plot", str(plot_path)]) == 0
    out = capsys.readouterr().out
    assert "Predicted" in out and "predicted max batch" in out and "CUDA context" in out
    data = json.loads(json_path.read_text())
    assert data["schema"] == JSON_SCHEMA and data["predicted"] is True
    assert data["budget_bytes"] == 2 << 20 and data["margin"] == 0.05
    assert data["config"]["optimizer"] == "adamw" and data["config"]["img_size"] == [32, 32]
    names = [v["name"] for v in data["variants"]]
    assert names == ["plain", "efficient", "frugal", "tv", "timm", "tv-plain"]
    for v in data["variants"]:
        assert v["peak_bytes"] > 0 and v["max_batch"] >= 1 and v["max_batch_peak_bytes"] <= data["usable_bytes"]
        assert sum(v["at_peak"].values()) == v["peak_bytes"]
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Nothing is overwritten without --force.
    assert run(cli, CLI_TINY + ["--json", str(json_path)]) == 2
    assert "exists" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--budget", "h100"], "cannot read budget 'h100'"),
    (["--budget", "24 parsecs"], "cannot read budget"),
    (["--budget", "10KiB"], "smaller than the parameters alone"),
    (["--img-size", "4"], "input 4x4 is too small for custom: it needs at least 5x5"),
    (["--img-size", "8", "8", "8", "8"], "--img-size takes 1 to 3 numbers"),
    (["--variants", "plain+compile"], "predicts eager steps"),
    (["--budget", "1e400"], "argument --budget: budget '1e400' is more bytes than a 64-bit machine addresses"),
    (["--threads", "100000000000"], "argument --threads: must be at most"),
    (["--batch-size", str(4 * 10 ** 18)], f"batch {4 * 10 ** 18} of 32x32 inputs is too large: the step's maps "
                                          "could hold up to"),
    (["--img-size", str(10 ** 11)], f"batch 4 of {10 ** 11}x{10 ** 11} inputs is too large"),
    (["--spatial-dims", "3", "--img-size", "16", "16"], "--img-size 16 16 is a 2D input but the model is 3D"),
    (["--spatial-dims", "1", "--img-size", "16", "16"], "--img-size 16 16 is a 2D input but the model is 1D"),
    (["--spatial-dims", "2", "--img-size", "8", "8", "8"], "--img-size 8 8 8 is a 3D input but the model is 2D"),
    (["--model-kwargs", "spatial_dims=3", "--img-size", "16", "16"], "is a 2D input but the model is 3D"),
    (["--margin", "1.5"], "--margin"),
])
def test_bad_input_is_one_line(cli, capsys, argv, message):
    assert run(cli, CLI_TINY + argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_one_size_with_spatial_dims_3_plans_a_cube(cli, tmp_path, capsys):
    # A 3D model is used on cubes: one --img-size is the cube's edge, as for the 3D model itself (it was a square,
    # which planned the 2D network instead).
    path = tmp_path / "plan.json"
    argv = CLI_TINY + ["--spatial-dims", "3", "--img-size", "8", "--batch-size", "2", "--variants", "efficient",
                       "--budget", "4MiB", "--json", str(path)]
    assert run(cli, argv) == 0
    out = capsys.readouterr().out
    assert "batch 2, 8x8x8" in out and "max cube edge" in out
    data = json.loads(path.read_text())
    assert data["config"]["img_size"] == [8, 8, 8] and data["config"]["max_edge"] is True
    assert data["variants"][0]["status"] == "ok" and data["variants"][0]["max_edge"] >= 8
    # A signal: one number is its length.
    assert run(cli, CLI_TINY + ["--spatial-dims", "1", "--img-size", "64", "--variants", "efficient"]) == 0
    assert "batch 4, 64," in capsys.readouterr().out


def test_sizes_that_contradict_a_chosen_spatial_dims_are_refused(cli, capsys):
    argv = [a for a in CLI_TINY if a not in ("--img-size", "32")] + ["--spatial-dims", "2", "--volume", "16"]
    assert run(cli, argv) == 2
    err = capsys.readouterr().err.strip()
    assert "--volume 16 is a 3D input but --spatial-dims is 2" in err and len(err.splitlines()) == 1
    volume = ModelSpec("tiny 3D", {**TINY, "spatial_dims": 3})
    with pytest.raises(ValueError, match=r"img_size \[16, 16\] is a 2D input but the model is 3D"):
        plan(volume, variants="efficient", img_size=(16, 16))
    assert plan(volume, variants="efficient", img_size=8, batch_size=2).config["img_size"] == [8, 8, 8]


def test_a_negative_count_fails_the_variant(monkeypatch):
    # Sizes that wrap around in torch's int64 gave negative figures that were printed as predictions.
    from effidense.harness import StepProbe as Probe

    measure = Probe.measure

    def wrapped(self, batch, size):
        memory = measure(self, batch, size)
        memory.saved_activation_bytes = -5 * 2 ** 60
        return memory

    monkeypatch.setattr(Probe, "measure", wrapped)
    r = plan(SPEC, variants="efficient", img_size=32, batch_size=2).variants[0]
    assert r.status == "failed" and r.peak_bytes is None
    assert r.error == f"RuntimeError: batch 2 at 32x32 counted {-5 * 2 ** 60} bytes of saved activations: a size " \
                      "overflowed"


def test_budget_short_of_parameters_says_by_how_much(cli, capsys):
    assert run(cli, CLI_TINY + ["--budget", "10KiB", "--margin", "0"]) == 2
    err = capsys.readouterr().err
    params = sum(t.numel() * t.element_size() for t in (*SPEC.build().parameters(), *SPEC.build().buffers()))
    assert f"short by {(params - 10240) / 1024:.1f} KiB" in err


def test_does_not_fit_at_batch_1(cli, capsys):
    assert run(cli, CLI_TINY + ["--budget", "60KiB", "--margin", "0", "--variants", "plain,frugal"]) == 1
    captured = capsys.readouterr()
    assert "does not fit" in captured.out
    lines = [line for line in captured.err.splitlines() if "does not fit even at batch 1" in line]
    assert len(lines) == 2 and "predicted peak" in lines[0]


def test_plan_is_an_effidense_command(capsys):
    from effidense.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "--help"])
    assert exit_info.value.code == 0
    assert "PREDICTED" in capsys.readouterr().out


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("variant", ["plain", "efficient", "frugal", "tv"])
def test_prediction_is_within_10_percent_of_cuda_max_memory_allocated(variant):
    """The predicted peak against the CUDA allocator's, for DenseNet-121 at 96 px in bf16, two batch sizes."""
    from effidense.modelspec import resolve_model

    spec = resolve_model("densenet121")
    predicted = plan(spec, variants=variant, img_size=96, batch_size=16, amp="bf16", optimizer="sgd-momentum")
    r = predicted.variants[0]
    device = torch.device("cuda")
    model = build_variant(variant, spec).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for batch in (16, 32):
        x = torch.randn(batch, 3, 96, 96, device=device)
        y = torch.randint(0, 1000, (batch,), device=device)
        for _ in range(2):  # the second step starts with the optimizer's state, as the prediction does
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(x)
            F.cross_entropy(out.float(), y).backward()
            del out
            optimizer.step()
            torch.cuda.synchronize()
        measured = torch.cuda.max_memory_allocated()
        guess = next(p["peak_bytes"] for p in r.probes if p["batch"] == batch)
        assert abs(guess - measured) <= 0.10 * measured, (variant, batch, guess, measured)


def test_plan_is_exported_lazily_from_effidense():
    import effidense
    from effidense import planner

    assert "plan" in effidense.__all__ and effidense.plan is planner.plan


def test_a_volume_plans_the_3d_densenet_and_its_monai_peer():
    """Three sizes for a named model mean its 3D form; MONAI's DenseNet is the peer there, torchvision's cannot be."""
    report = plan(SPEC, variants="plain,efficient,monai,tv", img_size=(16, 16, 16), batch_size=2, budget="1GiB")
    rows = {v.name: v for v in report.variants}
    assert rows["tv"].status == "skipped" and "2D only" in rows["tv"].error
    assert all(rows[n].ok for n in ("plain", "efficient", "monai")), rows
    saved = {n: rows[n].saved_activation_bytes for n in ("efficient", "plain", "monai")}
    assert saved["efficient"] < saved["plain"] <= saved["monai"], saved
    assert rows["efficient"].max_edge > rows["plain"].max_edge  # the cube edge is searched for volumes
    with torch.device("meta"):
        model = build_variant("efficient", ModelSpec("tiny 3D", {**TINY, "spatial_dims": 3}))
    assert isinstance(model.features.conv0, nn.Conv3d)


@pytest.mark.parametrize("spec, size, batch, optimizer, variants", [
    (SMALL, 32, 4, "sgd", ",".join(VARIANTS)),
    (SMALL_3D, 32, 2, "adamw", "plain,efficient,frugal,monai"),
])
def test_cpu_plan_is_within_3_percent_of_the_allocator(spec, size, batch, optimizer, variants):
    """Every mode and peer, 2D and 3D, SGD and AdamW: the predicted peak against a real step's by the CPU
    allocator's events (torch.profiler), one thread so that the kernels' choice is the same everywhere."""
    with torch_threads(1):
        report = plan(spec, variants=variants, img_size=size, batch_size=batch, optimizer=optimizer, device="cpu",
                      measure=True)
    assert report.config["threads"] == 1 and report.config["device"] == "cpu"
    for r in report.variants:
        assert r.ok, r.error
        assert abs(r.measured_error) <= 0.03, (r.name, r.peak_bytes, r.measured_peak_bytes)
        assert r.at_peak["scratch"] >= 0 and sum(r.at_peak.values()) == r.peak_bytes


def test_kernel_scratch_is_what_the_op_count_misses():
    """Without the CPU's scratch (the plan for CUDA) the recomputing modes' peak misses the allocator's by more
    than the margin: BatchNorm's backward temporary and oneDNN's reorders sit where their backward peaks."""
    with torch_threads(1):
        real = StepProbe(lambda: build_variant("efficient", SMALL), StepSpec(num_classes=5),
                         fake=False).allocator_peak(4, (32, 32))
        counted = plan(SMALL, variants="efficient", img_size=32, batch_size=4, device="cuda").variants[0]
        modelled = plan(SMALL, variants="efficient", img_size=32, batch_size=4, device="cpu").variants[0]
    assert counted.at_peak["scratch"] == 0 and modelled.at_peak["scratch"] > 0
    assert (real - counted.peak_bytes) / real > DEFAULT_MARGINS["cpu"]
    assert abs(modelled.peak_bytes - real) <= 0.005 * real


@pytest.mark.parametrize("channels", [(37, 12), (180, 12), (100, 36)])
def test_scratch_counts_onednn_padding_channels_to_whole_blocks(channels):
    """oneDNN's blocked layout pads channels to whole blocks: the reorders of a convolution whose channels do not fill
    them, and the padded output (forward) or weight gradient (backward) it makes first, are the allocator's peak."""
    from effidense.memory import cpu_peak_bytes
    from effidense.planner.scratch import scratch_model
    aten = torch.ops.aten
    cin, cout = channels
    with torch_threads(1):
        model = scratch_model("cpu", 1)
        x, w = torch.randn(8, cin, 24, 24), torch.randn(cout, cin, 3, 3)
        args = (x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1)
        out = aten.convolution(*args)
        back = (torch.randn_like(out), x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, True, False])
        grads = aten.convolution_backward(*back)
        for op, call, made in ((aten.convolution.default, args, out), (aten.convolution_backward.default, back,
                                                                        grads)):
            outputs = [made] if isinstance(made, torch.Tensor) else [t for t in made if t is not None]
            predicted = sum(t.numel() * t.element_size() for t in outputs) + model(op, call, {}, made)
            assert predicted == cpu_peak_bytes(lambda op=op, call=call: op(*call)), op


def test_largest_cpu_batch_fits_by_the_allocator_and_the_next_does_not():
    """At a small budget, by the allocator: without a margin the plan's largest batch is the allocator's (across
    batch 16, where one thread's 1x1 convolutions turn to oneDNN); with the default margin it fits."""
    size = (32, 32)
    with torch_threads(1):
        exact = plan(SMALL, variants="plain,efficient", img_size=32, batch_size=4, budget="6MiB", margin=0.0,
                     device="cpu")
        safe = plan(SMALL, variants="plain,efficient", img_size=32, batch_size=4, budget="6MiB", device="cpu")
        for r, default in zip(exact.variants, safe.variants, strict=True):
            assert 16 <= r.max_batch and default.max_batch <= r.max_batch, (r.name, r.max_batch)
            probe = StepProbe(lambda name=r.name: build_variant(name, SMALL), StepSpec(num_classes=5), fake=False)
            assert probe.allocator_peak(r.max_batch, size) <= exact.budget_bytes, r.name
            assert probe.allocator_peak(r.max_batch + 1, size) > exact.budget_bytes, r.name
            assert probe.allocator_peak(default.max_batch, size) <= safe.usable_bytes / (1 - safe.margin)
    assert safe.margin == DEFAULT_MARGINS["cpu"]


def test_check_prints_predicted_against_measured(cli, capsys, tmp_path):
    path = tmp_path / "check.json"
    assert run(cli, CLI_TINY + ["--check", "2", "--variants", "plain,efficient", "--device", "cpu", "--threads", "1",
                                "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "| variant | predicted peak | measured peak | predicted - measured |" in out
    assert "the CPU allocator's events" in out and "batch 2" in out
    data = json.loads(path.read_text())
    assert data["config"]["device"] == "cpu" and data["config"]["batch_size"] == 2
    for v in data["variants"]:
        assert v["measured_peak_bytes"] > 0 and v["measured_error"] == (v["peak_bytes"] - v["measured_peak_bytes"]) \
            / v["measured_peak_bytes"]


@pytest.mark.parametrize("argv, message", [
    (["--check", "2", "--budget", "1GiB"], "--check measures one step at its own batch"),
    (["--check", str(10 ** 9), "--img-size", "224", "--device", "cpu", "--variants", "efficient"],
     f"batch {10 ** 9} does not fit this machine"),
    (["--check", "2", "--device", "cuda"] if not torch.cuda.is_available() else ["--device", "tpu"],
     "needs a CUDA GPU" if not torch.cuda.is_available() else "invalid choice"),
])
def test_check_refuses_in_one_line(cli, capsys, argv, message):
    assert run(cli, CLI_TINY + argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_the_output_ends_with_the_command_for_the_recommended_mode(cli, capsys):
    """The fastest of our modes that fits the planned batch, at its largest batch: as a train command for a named
    model (one that flags change is described by its flags only)."""
    assert run(cli, CLI_TINY + ["--budget", "2MiB", "--variants", "plain,efficient,frugal"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    plain = next(line for line in out if line.startswith("| plain |"))
    max_batch = plain.split("|")[-3].strip()
    assert out[-1] == f"Recommended: --memory plain -b {max_batch} (predicted)"
    report = plan(SPEC, variants="plain,efficient,frugal", img_size=32, batch_size=4, budget="2MiB")
    assert recommendation(report, "densenet121") == f"Recommended (predicted): effidense train --model densenet121 " \
                                                    f"--img-size 32 --memory plain -b {max_batch}"
    big = plan(SPEC, variants="plain,efficient,frugal", img_size=32, batch_size=int(max_batch) + 1, budget="2MiB")
    assert "--memory efficient" in recommendation(big, None)  # plain no longer fits the batch asked for


def test_table_columns_sum_to_the_peak(cli, capsys, tmp_path):
    path = tmp_path / "plan.json"
    assert run(cli, CLI_TINY + ["--device", "cpu", "--json", str(path)]) == 0
    for v in json.loads(path.read_text())["variants"]:
        at = v["at_peak"]
        assert sum(at.values()) == v["peak_bytes"] and set(at) == {"parameters", "gradients", "optimizer_state",
                                                                    "input", "saved_activations", "transient",
                                                                    "scratch"}
    header = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| variant"))
    assert "= params+grads+optimizer | + batch and saved activations | + backward temporaries | + kernel scratch" \
        in header


def test_check_as_a_command_prints_no_profiler_log_lines():
    """The CPU peak comes from torch.profiler, whose kineto logs each profile's start and stop to stderr, and an ERROR
    where it finds no GPU: a command's own process silences it (KINETO_LOG_LEVEL unless set)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"}
    done = subprocess.run([sys.executable, "-m", "effidense", "plan", *CLI_TINY, "--check", "2", "--variants",
                           "efficient", "--device", "cpu", "--threads", "1"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert "| efficient |" in done.stdout
    assert not [line for line in done.stderr.splitlines() if line.startswith(("USDT:", "STAGE:", "ERROR:"))], \
        done.stderr


@pytest.mark.parametrize("argv, message", [
    (["--model", "effi_densenet12"], "did you mean 'effi_densenet121'?"),
    (["--budget", "h100"], "cannot read budget 'h100'"),
])
def test_a_typo_is_refused_before_torch_loads(argv, message):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "effidense", "plan", *argv],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert message in lines[-1]
    imported = [line.split("|")[-1].strip() for line in lines if line.startswith("import time:")]
    assert "effidense.cli.flags" in imported and not any(m.split(".")[0] == "torch" for m in imported)


def test_the_torch_free_names_are_the_libraries():
    from effidense import choices
    from effidense.fcdensenet import FCDENSENET_CONFIGS
    from effidense.harness import OPTIMIZERS
    from effidense.planner import DTYPES

    assert choices.SEGMENTATION_MODELS == tuple(FCDENSENET_CONFIGS)
    assert choices.OPTIMIZERS == OPTIMIZERS and choices.DTYPE_NAMES == tuple(DTYPES)


@pytest.mark.parametrize("slices", [4, 6])
def test_a_fake_sliced_backward_counts_what_every_slice_allocates(slices):
    """On fake tensors a sliced backward goes through a few representative slices; the step's tracked peak is still
    the real step's, byte for byte, with slices of two sizes (22 samples in 4 or 6 slices)."""
    def build() -> nn.Module:
        return DenseNet(growth_rate=8, block_config=(2,), num_init_features=16, num_classes=5, memory="frugal",
                        backward_slices=slices)

    peaks = [StepProbe(build, StepSpec(num_classes=5), fake=fake).measure(22, (32, 32)).peak_bytes
             for fake in (True, False)]
    assert peaks[0] == peaks[1]


@pytest.mark.slow
def test_variants_planned_side_by_side_match_those_planned_in_turn(monkeypatch):
    """Worker processes plan what one process plans, variant by variant, in the same order: asked for (``workers=2``),
    or left to the planner, which starts them beside itself once the plan has taken longer than a worker takes to
    start, which a tiny model's does not. A worker takes variants once it is ready; here the planning process is
    slowed (by its progress callback: each variant it starts waits until a worker has taken one) so that it is."""
    import time

    import effidense.planner.core as core

    kwargs = dict(variants="plain,efficient,frugal", img_size=32, batch_size=4, budget="3MiB")
    lines = []
    in_turn = plan(SPEC, workers=None, progress=lines.append, **kwargs)
    assert not any(line.endswith("(in a worker process)") for line in lines)  # none started: a tiny plan is quick
    monkeypatch.setattr(core, "WORKER_START_S", 0.0)
    monkeypatch.setattr(core, "cores", lambda: 2)  # as on a 2-core machine, whatever this one has

    def slowly(line: str) -> None:  # told as this process starts a variant, and as a worker takes one
        lines.append(line)
        deadline = time.monotonic() + 60
        while line.endswith(" ...") and time.monotonic() < deadline and not any(
                taken.endswith("(in a worker process)") for taken in lines):
            time.sleep(0.05)

    for side_by_side in (plan(SPEC, workers=2, **kwargs), plan(SPEC, workers=None, progress=slowly, **kwargs)):
        assert [r.name for r in side_by_side.variants] == [r.name for r in in_turn.variants]
        for a, b in zip(side_by_side.variants, in_turn.variants, strict=True):
            assert a.ok and (a.peak_bytes, a.max_batch, a.probes) == (b.peak_bytes, b.max_batch, b.probes), a.name
    assert any(line.endswith("(in a worker process)") for line in lines), lines


MONAI_SMALL = ["--model-kwargs", "init_features=8", "growth_rate=4", "block_config=(2,2)"]


def test_monai_names_plan_the_drop_in_as_built_beside_monai(capsys) -> None:
    """``--model DenseNet121`` plans effidense.monai's class itself in each mode, and MONAI's own, with MONAI's
    arguments; the prediction is that very model's step, counted on real tensors."""
    pytest.importorskip("monai")
    assert load_tool("plan").main(["--model", "DenseNet121", "--volume", "16", "--batch-size", "2", "--quiet",
                                   *MONAI_SMALL]) == 0
    out = capsys.readouterr().out
    assert "DenseNet121 (effidense.monai, 3D), batch 2, 16x16x16" in out
    rows = {line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ")}
    assert {"plain", "efficient", "frugal", "monai"} <= rows
    builders, min_size = monai_variants("DenseNet121", 3, 1, 2, init_features=8, growth_rate=4, block_config=(2, 2))
    kwargs = dict(variants="efficient,monai", img_size=(16, 16, 16), batch_size=2, in_chans=1, num_classes=2,
                  min_size=min_size)
    predicted, real = plan(builders, **kwargs), plan(builders, fake=False, **kwargs)
    for p, r in zip(predicted.variants, real.variants, strict=True):
        assert p.ok and p.peak_bytes == r.peak_bytes, p.name
    assert load_tool("plan").main(["--model", "DenseNet121", "--growth-rate", "8", "--quiet"]) == 2
    assert one_line_error(capsys.readouterr().err) == (
        "effidense plan: error: --growth-rate do not apply to DenseNet121; give MONAI's arguments with "
        "--model-kwargs (e.g. init_features=32 growth_rate=16 norm=instance)")


@pytest.mark.slow
def test_worker_processes_answer_raise_and_die_apart():
    """A call's result comes back by name; one that raises raises in the caller; a process that dies fails its call
    alone, with its exit code."""
    from effidense.planner.workers import in_processes

    # eval: one builtin function (it pickles by name) for a call that answers and one whose process exits
    results = in_processes(eval, [("a", ("2 ** 5",)), ("gone", ("__import__('os')._exit(3)",))], 2)
    assert results["a"] == 32
    assert isinstance(results["gone"], ChildProcessError) and "exit code 3" in str(results["gone"])
    with pytest.raises(ValueError, match="invalid literal"):
        in_processes(int, [("bad", ("x",))], 1)


@pytest.mark.slow
def test_this_process_and_ready_workers_share_one_queue():
    """With ``here``, this process takes calls too, and a worker takes them only once it is ready: every call is
    answered once, by one or the other, and a job this process finishes alone starts no worker."""
    import time

    from effidense.planner.workers import in_processes

    def slowly(name: str) -> int:
        time.sleep(1.0)
        return int(name) * 2

    calls = [(str(i), (f"{i} * 2",)) for i in range(6)]
    by_worker = []
    results = in_processes(eval, calls, 1, here=slowly, wait=0.0, taken=by_worker.append)
    assert results == {str(i): i * 2 for i in range(6)}
    assert 0 < len(by_worker) < 6
    by_worker.clear()
    assert in_processes(eval, calls, 1, here=lambda name: int(name) * 2, wait=30.0, taken=by_worker.append) == results
    assert not by_worker


def test_one_worker_plans_in_this_process(monkeypatch):
    """``workers=1`` (the default), and every real plan, plans the variants one at a time here: a single spawned
    worker with this process waiting for it would only add its start."""
    import effidense.planner.core as core

    def no_process(*args, **kwargs):
        raise AssertionError("a worker process was started")

    monkeypatch.setattr(core, "in_processes", no_process)
    for fake in (True, False):
        report = plan(SPEC, variants="plain,efficient", img_size=8, batch_size=2, fake=fake)
        assert [r.name for r in report.variants] == ["plain", "efficient"] and all(r.ok for r in report.variants)
