"""DDP for bench: spawning benchmark workers, and merging one variant's results over ranks."""
from __future__ import annotations

import copy
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any

import torch
import torch.multiprocessing as mp

from ..cli import prepare_exit
from ..fileio import atomic_write_bytes
from ..harness.distributed import backend_for, free_port, process_group
from .config import BenchConfig, VariantResult

__all__ = ["merge_ranks", "spawn_benchmark"]


# What a spawned rank runs: ``run(cfg, local_rank)`` -> that rank's merged results (runner.run_benchmark). Passed in,
# so that this module needs nothing from the runner, which needs this one.
RankRunner = Callable[[BenchConfig, int], list[VariantResult]]


def _bench_worker(rank: int, run: RankRunner, world: int, cfg: BenchConfig, init_method: str,
                  result_path: str) -> None:
    if cfg.device == "cpu" and not cfg.threads:
        cfg = replace(cfg, threads=max(1, (os.cpu_count() or 1) // world))  # ranks share the cores
    with process_group(backend_for(cfg.device), rank, world, init_method):
        results = run(cfg, rank)
    if rank == 0:
        atomic_write_bytes(result_path, json.dumps([asdict(r) for r in results]).encode())
    prepare_exit()  # a spawned rank exits once its work is done


def spawn_benchmark(run: RankRunner, cfg: BenchConfig, world: int) -> list[VariantResult]:
    """``run`` in ``world`` spawned processes forming one process group; rank 0's results."""
    with tempfile.TemporaryDirectory(prefix="effidense-bench-") as tmp:
        path = os.path.join(tmp, "results.json")
        mp.spawn(_bench_worker, args=(run, world, cfg, f"tcp://127.0.0.1:{free_port()}", path), nprocs=world, join=True)
        with open(path) as f:
            return [VariantResult(**r) for r in json.load(f)]


_RANK_FIELDS = ("status", "error", "forward_ms", "backward_ms", "step_ms", "host_ms", "activation_bytes",
                "peak_bytes", "compile_s", "max_batch")


def merge_ranks(result: VariantResult, world: int, batch_size: int) -> VariantResult:
    """Aggregate a variant over DDP ranks: the slowest rank's times, the largest per-rank memory, total images/s."""
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, {k: getattr(result, k) for k in _RANK_FIELDS})
    failed = [g for g in gathered if g["status"] != "ok"]
    if failed:
        merged = VariantResult(result.variant, status=failed[0]["status"], error=failed[0]["error"])
    else:
        merged = copy.copy(result)

        def worst(key: str) -> Any:
            values = [g[key] for g in gathered if g[key] is not None]
            return max(values) if values else None

        merged.forward_ms, merged.backward_ms, merged.step_ms = worst("forward_ms"), worst("backward_ms"), \
            worst("step_ms")
        merged.activation_bytes, merged.peak_bytes = worst("activation_bytes"), worst("peak_bytes")
        merged.compile_s, merged.host_ms = worst("compile_s"), worst("host_ms")
        merged.ratio_b_f = merged.backward_ms / merged.forward_ms if merged.forward_ms else None
        merged.images_per_s = world * batch_size / (merged.step_ms / 1000.0) if merged.step_ms else None
    merged.per_rank = gathered
    return merged
