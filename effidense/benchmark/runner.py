"""The per-process benchmark (:func:`run_benchmark`), the whole run (:func:`benchmark`) and the depth sweep."""
from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..densenet import MEMORY_MODES
from ..failures import short_error
from ..harness import (
    AMP_DTYPES,
    CHANNELS_LAST,
    COMPILE_SUFFIX,
    PEER_LIBRARY,
    PEERS,
    StepProbe,
    StepSpec,
    Timer,
    backend_for,
    build_variant,
    check_world,
    environment,
    input_shape,
    largest_batch,
    load_weights,
    peer_unsupported,
    process_group,
    release,
    torch_threads,
    torchrun_world,
    training_step,
)
from ..memory import SavedTensorMeter, activation_floor_bytes, cuda_peak_bytes
from ..progress import Progress
from .config import HOST_BATCH, BenchConfig, BenchReport, VariantResult, host_img_size
from .cuda import cuda_fits, device_for_rank
from .distributed import merge_ranks, spawn_benchmark
from .timing import StepRunner, failed_result, run_batch, time_in_rounds

__all__ = ["run_benchmark", "benchmark", "memory_by_depth", "activation_floor"]


# Relative output difference (max |a - b| / max |plain|) above which a variant is not "the same function".
_SAME_FUNCTION_TOL = 1e-3


def _check_same_function(model: nn.Module, x: torch.Tensor, reference: torch.Tensor) -> float:
    if not reference.isfinite().all():  # every difference would be NaN: no variant can be checked against it
        raise RuntimeError("the plain model's eval output is not finite (NaN or inf): nothing to check against")
    model.eval()
    with torch.no_grad():
        out = model(x)
    model.train()
    diff = (out.float() - reference).abs().max().item() / max(reference.abs().max().item(), 1e-12)
    if not diff <= _SAME_FUNCTION_TOL:
        raise RuntimeError(f"does not compute the plain model's function: eval output differs by {diff:.3g} "
                           f"(relative, tolerance {_SAME_FUNCTION_TOL:g})")
    return diff


def run_benchmark(cfg: BenchConfig, local_rank: int = 0) -> list[VariantResult]:
    """Measure every variant in ``cfg`` in this process; under DDP, every rank calls this and gets the merged results.

    A variant that raises (out of memory, no peer counterpart, a compile error) becomes a failed or skipped result;
    the others still run.
    """
    with torch_threads(cfg.threads):
        return _run_benchmark(cfg, local_rank)


def _run_benchmark(cfg: BenchConfig, local_rank: int) -> list[VariantResult]:
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if distributed else 0
    device = device_for_rank(cfg.device, local_rank)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    torch.manual_seed(cfg.seed)
    base = _build("plain", cfg)
    state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    x, y = run_batch(cfg, device, rank)
    host_batch = run_batch(cfg, device, rank, HOST_BATCH, host_img_size(cfg.spec))
    probe = x[: min(2, len(x))]
    base.to(device).eval()
    if cfg.channels_last:
        base.to(memory_format=CHANNELS_LAST[cfg.spec.arg("spatial_dims")])
    with torch.no_grad():
        reference = base(probe).float()
    del base

    # Warm-up steps (at least one), the host step's warm-up, and at full size the metered step(s).
    prepare_steps = max(cfg.warmup, 1) + 1 + (0 if cfg.host_only else 1 + (device.type == "cuda"))
    # Each compiled variant compiles cold, which drops what the compiled variants before it compiled: they compile
    # again, untimed, before the rounds.
    recompiled = [v for v in cfg.variants if v.endswith(COMPILE_SUFFIX)][:-1]
    total = (prepare_steps + cfg.steps) * len(cfg.variants) + len(recompiled)
    progress = Progress(total, "bench", "step", cfg.progress and rank == 0)
    results: dict[str, VariantResult] = {}
    trainers: dict[str, StepRunner] = {}
    first_step_s: dict[str, float | None] = {}
    try:
        for variant in cfg.variants:
            progress.describe(f"bench {variant}")
            before = progress.n
            results[variant], trainer, first_step_s[variant] = _prepare_variant(
                variant, cfg, device, state, (x, y), host_batch, probe, reference, progress)
            if trainer is not None:
                trainers[variant] = trainer
            elif device.type == "cuda":  # what a variant that ran out of memory left behind
                release(device)
            # a variant that failed or was skipped part-way counts its remaining steps, and its rounds, as done
            progress.advance(prepare_steps - (progress.n - before) + (cfg.steps if trainer is None else 0))
        for variant in recompiled:
            if variant in trainers:
                progress.describe(f"bench {variant}")
                progress.note("compiling again (untimed)")
                try:
                    _warm(trainers[variant], cfg, host_batch)
                except Exception as error:
                    results[variant] = failed_result(variant, error, cfg)
                    del trainers[variant]
                    progress.advance(cfg.steps)
                progress.note("")
            progress.advance()
        time_in_rounds(cfg, device, results, trainers, first_step_s, progress)
        if cfg.max_batch:
            for variant, trainer in trainers.items():
                progress.describe(f"bench {variant}")
                for other in trainers.values():  # only this variant's memory should count
                    other.model.zero_grad(set_to_none=True)
                release(device)
                try:
                    fits = cuda_fits(trainer, x, cfg.spec.arg("num_classes"), cfg.channels_last, progress)
                    results[variant].max_batch = largest_batch(fits, cfg.batch_size, cfg.max_batch_limit)
                except Exception as error:
                    results[variant] = failed_result(variant, error, cfg)
                progress.note("")
    finally:
        trainers.clear()
        progress.close()
    ordered = [results[v] for v in cfg.variants]
    if distributed:
        ordered = [merge_ranks(r, torch.distributed.get_world_size(), cfg.batch_size) for r in ordered]
    return ordered


Batch = tuple[torch.Tensor, torch.Tensor]


def _prepare_variant(variant: str, cfg: BenchConfig, device: torch.device, state: dict[str, torch.Tensor],
                     batch: Batch, host_batch: Batch, probe: torch.Tensor, reference: torch.Tensor,
                     progress: Progress) -> tuple[VariantResult, StepRunner | None, float | None]:
    """Build, check, warm up (compile) and measure the memory of one variant; returns its result so far, the trainer
    to time it with (None if it failed or was skipped) and the duration of its first step in seconds.

    With ``cfg.host_only`` the warm-up runs on the host batch and nothing runs at full size."""
    result = VariantResult(variant)
    base_variant = variant.removesuffix(COMPILE_SUFFIX)
    compiled = variant.endswith(COMPILE_SUFFIX)
    reason = _unsupported(base_variant, cfg)
    if reason:
        result.status, result.error = "skipped", reason
        return result, None, None
    try:
        torch.manual_seed(cfg.seed)
        model = _build(base_variant, cfg)
        load_weights(model, base_variant, state)
        model.to(device).train()
        if cfg.channels_last:
            model.to(memory_format=CHANNELS_LAST[cfg.spec.arg("spatial_dims")])
        if not compiled:  # compiling an eval graph just for this check would double the compile time
            result.same_function_rel_diff = _check_same_function(model, probe, reference)
        model = _wrap(model, compiled, device, cfg.compile_mode)
        trainer = StepRunner(model, *batch, cfg.amp, host_batch)
        timer = Timer(device)

        first_step_s = None
        if compiled:
            torch._dynamo.reset()  # nothing another variant, or an earlier run in this process, traced is reused
        for i in range(max(cfg.warmup, 1 if compiled else 0)):
            progress.note("compiling (first step)" if compiled and i == 0 else "warm-up")
            with _cold_compile() if compiled and i == 0 else contextlib.nullcontext():
                timer.sync()
                start = time.perf_counter()
                trainer.step(*host_batch) if cfg.host_only else trainer.step()
                timer.sync()
            if i == 0:
                first_step_s = time.perf_counter() - start
            progress.advance()
        progress.note("warm-up (host step)")  # a new input shape: a compiled model compiles again here
        trainer.step(*host_batch)
        progress.advance()
        progress.note("")
        if cfg.host_only:
            return result, trainer, first_step_s

        meter = SavedTensorMeter(exclude=model)
        training_step(model, *batch, cfg.amp, meter=meter)  # with its backward, as DDP expects of every forward
        result.activation_bytes = meter.bytes
        progress.advance()

        if device.type == "cuda":
            model.zero_grad(set_to_none=True)
            result.peak_bytes = cuda_peak_bytes(trainer.step, device)
            model.zero_grad(set_to_none=True)
            progress.advance()
        return result, trainer, first_step_s
    except Exception as error:
        return failed_result(variant, error, cfg), None, None


def _unsupported(variant: str, cfg: BenchConfig) -> str | None:
    """Why ``variant`` (without ``+compile``) has no model for ``cfg``, or None when it has one."""
    if cfg.builders is not None:
        if variant in cfg.builders:
            return None
        return f"{PEER_LIBRARY.get(variant, variant)} has no counterpart of {cfg.spec.name}"
    return peer_unsupported(cfg.spec, variant) if variant in PEERS else None


def _build(variant: str, cfg: BenchConfig) -> nn.Module:
    """A fresh, uncompiled model for ``variant`` (without ``+compile``)."""
    return build_variant(variant, cfg.spec) if cfg.builders is None else cfg.builders[variant]()


def _cold_compile() -> contextlib.AbstractContextManager:
    """Compile as on a fresh machine: without inductor's and AOTAutograd's on-disk caches, which would otherwise
    serve the kernels an earlier run compiled (and show a compile time near zero)."""
    import torch._functorch.config
    import torch._inductor.config

    stack = contextlib.ExitStack()
    stack.enter_context(torch._inductor.config.patch(fx_graph_cache=False))
    stack.enter_context(torch._functorch.config.patch(enable_autograd_cache=False))
    return stack


def _warm(trainer: StepRunner, cfg: BenchConfig, host_batch: Batch) -> None:
    """One step at each size the rounds time: a compiled model whose graphs were dropped compiles them again."""
    if not cfg.host_only:
        trainer.step()
    trainer.step(*host_batch)


def _wrap(model: nn.Module, compiled: bool, device: torch.device, mode: str | None = None) -> nn.Module:
    """Wrap in DDP, then compile the whole model (with torch.compile's ``mode``), effidense's and the peers' alike:
    torch compiles a DDP model from outside, and effidense's ``set_compile`` traces the same whole graph. Sizes are
    static, as a training run's fixed input size is: each size the rounds time compiles once for itself (with
    symbolic sizes torch 2.14's inductor fails on FC-DenseNet's backward)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if compiled:
        model = torch.compile(model, dynamic=False, **({} if mode is None else {"mode": mode}))
    return model


DEPTH_SWEEP_VARIANTS = (*MEMORY_MODES, "tv", "timm")


def memory_by_depth(cfg: BenchConfig, scales: Sequence[float],
                    modes: Sequence[str] = DEPTH_SWEEP_VARIANTS) -> dict[str, Any]:
    """Activation bytes (the meter) of one training forward for the model family at each depth scale.

    The family scales every block's layer count of ``cfg.spec`` by each factor in ``scales``; batch, image size and
    autocast are the run's. ``modes`` are variants (our modes and peers, uncompiled); a peer that cannot build the
    family is left out, with the reason under ``"skipped"``. The forwards run on tensors that allocate nothing
    (:class:`effidense.harness.StepProbe`, ``FakeTensorMode`` on the CPU): the meter's count is device-independent,
    so the sweep takes seconds and next to no memory at any depth or batch.
    """
    specs = {s.block_config: s for s in (cfg.spec.scaled(f) for f in scales)}
    specs_sorted = sorted(specs.values(), key=lambda s: s.depth)
    sweep: dict[str, Any] = {"depths": [s.depth for s in specs_sorted],
                             "block_configs": [list(s.block_config) for s in specs_sorted],
                             "activation_bytes": {}, "skipped": {}}
    for mode in modes:
        reason = peer_unsupported(cfg.spec, mode) if mode in PEERS else None
        if reason:
            sweep["skipped"][mode] = reason
        else:
            sweep["activation_bytes"][mode] = []
    step = StepSpec(in_chans=cfg.spec.arg("in_chans"), num_classes=cfg.spec.arg("num_classes"),
                    amp=AMP_DTYPES[cfg.amp] if cfg.amp else None, optimizer="none")
    errors: list[str] = []
    for spec in specs_sorted:
        for mode in sweep["activation_bytes"]:
            try:
                probe = StepProbe(lambda spec=spec, mode=mode: build_variant(mode, spec), step)
                sweep["activation_bytes"][mode].append(
                    probe.saved_bytes(cfg.batch_size, input_shape(cfg.spec, 1, cfg.img_size)[2:]))
            except Exception as error:  # keep the other points
                sweep["activation_bytes"][mode].append(None)
                errors.append(f"depth {spec.depth} {mode}: {short_error(error, kind=True)}")
    sweep["errors"] = errors
    return sweep


def benchmark(cfg: BenchConfig, processes: int = 1, argv: Sequence[str] | None = None,
              depth_scales: Sequence[float] | None = None) -> BenchReport | None:
    """Run the whole benchmark: in this process, in ``processes`` spawned DDP workers, or as one torchrun rank.

    Returns the report on the main process and None on the other torchrun ranks. ``depth_scales`` adds the
    activation-memory-vs-depth sweep (:func:`memory_by_depth`), measured on the main process alone. ``argv``: the
    arguments the command parsed, for the environment's record.
    """
    launched = torchrun_world()
    if cfg.max_batch and (processes > 1 or launched is not None):
        raise ValueError("--max-batch searches one GPU's memory; run it without --gpus/torchrun")
    if launched is not None:
        rank, local_rank, world = launched
        if processes not in (1, world):
            raise ValueError(f"--gpus {processes} contradicts torchrun's {world} processes; drop --gpus")
        check_world(cfg.device, world)
        with process_group(backend_for(cfg.device), rank, world, "env://"):
            results = run_benchmark(cfg, local_rank=local_rank)
        if rank != 0:
            return None
    elif processes > 1:
        world = processes
        check_world(cfg.device, world)
        results = spawn_benchmark(run_benchmark, cfg, world)
    else:
        world = 1
        results = run_benchmark(cfg)
    with torch_threads(cfg.threads):
        sweep = memory_by_depth(cfg, depth_scales) if depth_scales else None
        env = environment(cfg.device, argv, world)
        floor = None if cfg.host_only else activation_floor(cfg)
    return BenchReport(cfg, results, env, world, sweep, floor)


def activation_floor(cfg: BenchConfig) -> int:
    """:func:`effidense.activation_floor_bytes` for one rank's batch in fp32 (measured on one image, every term
    is linear in the batch size)."""
    model = _build("plain", cfg).eval()
    image = torch.zeros(input_shape(cfg.spec, 1, cfg.img_size))
    return activation_floor_bytes(model, image) * cfg.batch_size
