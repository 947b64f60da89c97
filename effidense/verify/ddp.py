"""DistributedDataParallel checks, run inside a process group (spawned here, or launched by torchrun)."""
from __future__ import annotations

import copy
import json
import os
import tempfile
from dataclasses import asdict, replace
from typing import Any

import torch
import torch.multiprocessing as mp
from torch import Tensor, nn

from ..cli import prepare_exit
from ..densenet import MEMORY_MODES
from ..failures import short_error
from ..fileio import atomic_write_bytes
from ..harness.distributed import backend_for, check_world, ddp_model, free_port, process_group
from ..harness.step import training_step
from ..modelspec import ModelSpec
from .core import (
    RAN,
    SGD,
    Check,
    buffers_of,
    compare_tensors,
    grads_of,
    input_batch,
    params_of,
    perturb_running_stats,
    set_deterministic,
    tolerance,
)

__all__ = ["ddp_checks", "run_ddp"]


def ddp_checks(spec: ModelSpec, device: torch.device, batch_per_rank: int, img_size: int,
               seed: int = 0, sync_bn: bool = False) -> list[Check]:
    """Checks of DistributedDataParallel training; call on every rank of an initialised process group.

    With ``sync_bn`` the DDP models' norms are ``nn.SyncBatchNorm``. Returns this rank's checks;
    :func:`_merge_rank_checks` combines them over ranks.
    """
    dist = torch.distributed
    rank, world = dist.get_rank(), dist.get_world_size()
    set_deterministic(device)
    x_full, y_full = input_batch(spec, batch_per_rank * world, img_size, torch.float32, device, seed + 1)
    shards = list(zip(x_full.split(batch_per_rank), y_full.split(batch_per_rank), strict=True))
    x, y = shards[rank]
    torch.manual_seed(seed)
    base = spec.build("plain")
    perturb_running_stats(base, seed)
    state = copy.deepcopy(base.state_dict())
    tol = tolerance(torch.float32, device.type)
    # The full batch at once sums gradient contributions in another order than shards + all-reduce.
    tol_full = max(tol, 1e-5)
    checks: list[Check] = []
    plain_grads: dict[str, dict[str, Tensor | None]] = {}
    label = f"{spec.name} / DDP {world} ranks ({backend_for(device.type)}){', SyncBatchNorm' if sync_bn else ''}, fp32"

    def build(mode: str, eval_mode: bool = False) -> nn.Module:
        model = spec.build(mode)
        model.load_state_dict(state)
        return model.to(device).train(not eval_mode)

    for mode in MEMORY_MODES:
        subject = f"{mode}"
        # Single-process references.
        if sync_bn:
            # Statistics over every rank's shard: the full batch at once in train mode. Each rank's loss is its
            # shard's mean, so DDP's average of the ranks' gradients is the full-batch mean's gradient.
            single = build(mode)
            training_step(single, x_full, y_full)
            train_grads = grads_of(single)
            train_stats, train_counts = buffers_of(single, False), buffers_of(single, True)
            reference, train_tol = "single process on the full batch", tol_full
        else:
            train_grads, train_stats, train_counts = {}, {}, {}
            for r, (xs, ys) in enumerate(shards):
                single = build(mode)
                training_step(single, xs, ys, shards=world)
                for name, grad in grads_of(single).items():
                    if grad is not None:
                        train_grads[name] = grad if train_grads.get(name) is None else train_grads[name] + grad
                    else:
                        train_grads.setdefault(name, None)
                if r == rank:
                    train_stats, train_counts = buffers_of(single, False), buffers_of(single, True)
            reference, train_tol = "single process, sum over rank shards", tol
        full = build(mode, eval_mode=True)
        training_step(full, x_full, y_full)
        full_grads = grads_of(full)

        # DDP, train mode.
        ddp = ddp_model(build(mode), device, sync_bn)
        training_step(ddp, x, y)
        grads = grads_of(ddp)
        checks.append(compare_tensors("ddp", label, subject, f"train: gradients == {reference}", grads, train_grads,
                               train_tol))
        stats_reference = "single process on the full batch" if sync_bn else "single process on own shard"
        checks.append(compare_tensors("ddp", label, subject, f"train: BN running stats == {stats_reference}",
                               buffers_of(ddp, False), train_stats, train_tol))
        checks.append(compare_tensors("ddp", label, subject, "train: num_batches_tracked (exact)",
                               buffers_of(ddp, True), train_counts, 0.0))
        checks.append(_agree(label, subject, "train: gradients identical on all ranks", grads))
        optimizer = torch.optim.SGD(ddp.parameters(), **SGD)
        optimizer.step()
        checks.append(_agree(label, subject, "parameters identical on all ranks after an SGD step", params_of(ddp)))
        if mode == "plain":
            plain_grads["train"] = grads
        else:
            checks.append(compare_tensors("ddp", label, subject, "train: gradients == plain under DDP", grads,
                                   plain_grads["train"], tol))

        # DDP, eval mode (running statistics): per-rank means average to the full-batch mean exactly.
        ddp_eval = ddp_model(build(mode, eval_mode=True), device, sync_bn)
        training_step(ddp_eval, x, y)
        eval_grads = grads_of(ddp_eval)
        checks.append(compare_tensors("ddp", label, subject, "eval: gradients == single process on the full batch",
                               eval_grads, full_grads, tol_full))
        checks.append(_agree(label, subject, "eval: gradients identical on all ranks", eval_grads))
        if mode == "plain":
            plain_grads["eval"] = eval_grads
        else:
            checks.append(compare_tensors("ddp", label, subject, "eval: gradients == plain under DDP", eval_grads,
                                   plain_grads["eval"], tol))
    return checks


def _agree(case: str, subject: str, what: str, tensors: dict[str, Tensor | None]) -> Check:
    """Every rank holds bitwise the same tensors as rank 0."""
    mine = {k: None if v is None else v.cpu() for k, v in tensors.items()}
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, mine)
    checks = [compare_tensors("ddp", case, subject, what, other, gathered[0], 0.0) for other in gathered[1:]]
    worst = max(checks, key=lambda c: (not c.passed, c.max_abs or 0.0), default=None)
    if worst is None:
        return Check("ddp", case, subject, what, True, 0.0, 0.0, 0.0, "one rank")
    return replace(worst, detail=worst.detail.replace("bitwise equal", f"bitwise equal on {len(gathered)} ranks"))


def _merge_rank_checks(per_rank: list[list[Check]]) -> list[Check]:
    """One check per comparison: passed on every rank, the worst rank's differences."""
    merged = []
    for same in zip(*per_rank, strict=True):
        worst_rank, worst = max(enumerate(same), key=lambda rc: (not rc[1].passed, rc[1].max_rel or 0.0))
        exact = all(c.max_abs == 0 and c.passed for c in same)
        detail = worst.detail if len(same) == 1 or exact else f"{worst.detail} (worst: rank {worst_rank})"
        merged.append(replace(worst, passed=all(c.passed for c in same), detail=detail))
    return merged


def _ddp_rank(spec: ModelSpec, device_kind: str, local_rank: int, batch_per_rank: int, img_size: int,
              seed: int, sync_bn: bool = False) -> list[Check]:
    """This rank's DDP checks, merged over ranks (returned on every rank)."""
    if device_kind == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    try:
        mine = ddp_checks(spec, device, batch_per_rank, img_size, seed, sync_bn)
    except Exception as error:
        mine = [Check("ddp", f"{spec.name} / DDP", "all modes", RAN, False,
                      detail=f"rank {torch.distributed.get_rank()}: {short_error(error, kind=True)}")]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, mine)
    if len({len(g) for g in gathered}) != 1:  # some rank failed early: report every rank's failures
        return [c for g in gathered for c in g if not c.passed] or [c for g in gathered for c in g]
    return _merge_rank_checks(gathered)


def _ddp_worker(rank: int, world: int, device_kind: str, spec: ModelSpec, batch_per_rank: int, img_size: int,
                seed: int, init_method: str, result_path: str, sync_bn: bool = False) -> None:
    if device_kind == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    with process_group(backend_for(device_kind), rank, world, init_method):
        checks = _ddp_rank(spec, device_kind, rank, batch_per_rank, img_size, seed, sync_bn)
    if rank == 0:
        atomic_write_bytes(result_path, json.dumps([asdict(c) for c in checks]).encode())
    prepare_exit()  # a spawned rank exits once its work is done


def run_ddp(spec: ModelSpec, device: str, nproc: int, batch_per_rank: int, img_size: int, seed: int = 0,
            torchrun: tuple[int, int, int] | None = None, sync_bn: bool = False) -> list[Check] | None:
    """DDP checks in ``nproc`` spawned processes, or as one rank of a torchrun launch (``torchrun`` =
    (rank, local_rank, world)), with ``nn.SyncBatchNorm`` norms if ``sync_bn``. Returns the merged checks, or None
    on torchrun ranks other than 0."""
    if torchrun is not None:
        rank, local_rank, world = torchrun
        check_world(device, world)
        with process_group(backend_for(device), rank, world, "env://"):
            checks = _ddp_rank(spec, device, local_rank, batch_per_rank, img_size, seed, sync_bn)
        return checks if rank == 0 else None
    check_world(device, nproc)
    if nproc < 2:
        raise ValueError(f"DDP checks need at least 2 processes, got {nproc}")
    with tempfile.TemporaryDirectory(prefix="effidense-gradcheck-") as tmp:
        path = os.path.join(tmp, "checks.json")
        mp.spawn(_ddp_worker, nprocs=nproc, join=True,
                 args=(nproc, device, spec, batch_per_rank, img_size, seed, f"tcp://127.0.0.1:{free_port()}", path,
                       sync_bn))
        with open(path) as f:
            return [Check(**c) for c in json.load(f)]
