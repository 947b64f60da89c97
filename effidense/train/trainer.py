"""The built-in trainer: timm's training recipe assembled from timm's and torch's library parts.

One process or many under ``torchrun`` (DistributedDataParallel; nccl on GPU, gloo on CPU). Rank 0 alone writes the
run directory: ``args.yaml``, ``summary.csv`` (one row per epoch, as timm writes it), ``last.safetensors`` +
``last.state.pt`` (every epoch, and every ``--checkpoint-interval`` steps) and ``model_best.safetensors``.
A resumed run repeats an unbroken one exactly on CPU: see :mod:`.data` and :mod:`.checkpoint`.

What the run directory guarantees (:mod:`.rundir`): one run at a time writes it; every file is written atomically;
checkpoints are committed as one unit (:mod:`.checkpoint`), and never with non-finite weights. Epochs are counted
from 0 everywhere (logs, ``summary.csv``, checkpoints), as timm counts them.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from timm.data import resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import (
    AverageMeter,
    ModelEmaV3,
    NativeScaler,
    accuracy,
    dispatch_clip_grad,
    distribute_bn,
    random_seed,
    unwrap_model,
)
from torch import nn
from tqdm import tqdm

from ..fileio import short_error
from ..harness.distributed import ddp_model, destroy_process_group
from ..progress import Progress
from ..weights import listing, values_problem
from .args import args_as_dict, args_to_yaml
from .checkpoint import (
    TrainingCheckpoint,
    all_finite,
    checkpoint_files,
    find_checkpoint,
    resolve_resume,
    rng_state,
    save_training_checkpoint,
    save_weights,
    set_rng_state,
    write_file,
)
from .data import ResumableSampler, build_datasets, check_readable, eval_loader, set_transforms, train_loader
from .distributed import Processes, check_sync_bn, init_processes, reduce_sum
from .errors import TrainError, TrainingDiverged, TrainingInterrupted
from .model import build_model, check_input_size
from .rundir import (
    RUN_FILES,
    append_summary,
    fresh_start_problem,
    lock_run_directory,
    prepare_run_directory,
    run_directory,
    trim_summary,
)

__all__ = ["train"]

# Testing hook: SIGKILL this process right after optimizer step N, to test resuming a killed run.
_KILL_AFTER_STEP_ENV = "EFFIDENSE_TEST_KILL_AFTER_STEP"
# The flags that shape the optimizer's state: a resumed run must keep them.
_OPTIMIZER_ARGS = ("opt", "weight_decay", "momentum")


def _base_lr(args: argparse.Namespace, world_size: int) -> float:
    """timm's rule when --lr is not given: 0.1 per 256 images of global batch (square root for ada*/lamb)."""
    if args.lr is not None:
        return args.lr
    ratio = args.batch_size * world_size * args.grad_accum_steps / 256
    if any(name in args.opt.lower() for name in ("ada", "lamb")):
        ratio = ratio ** 0.5
    return 0.1 * ratio


def _is_better(metric: float, best: float | None, eval_metric: str) -> bool:
    if not math.isfinite(metric):  # a NaN metric never makes a model "best"
        return False
    return best is None or (metric < best if eval_metric == "loss" else metric > best)




class _Trainer:
    def __init__(self, args: argparse.Namespace, ctx: Processes, stack: contextlib.ExitStack) -> None:
        self.args, self.ctx = args, ctx
        device = ctx.device

        # Data first: a missing or empty data directory is reported before any model is built.
        train_set, val_set, num_classes = build_datasets(args)
        per_rank = math.ceil(len(train_set) / ctx.world_size)
        if per_rank < args.batch_size:
            raise TrainError(f"the training set has {len(train_set)} images: fewer than one batch of "
                             f"{args.batch_size} per process ({ctx.world_size} process(es)); lower --batch-size")
        resume_path = resolve_resume(args.resume) if args.resume else None

        random_seed(args.seed, ctx.rank)
        notes: list[str] = []
        model = build_model(args, args.num_classes or num_classes, notes)
        if args.sync_bn:
            check_sync_bn(model, ctx, args.model)
        for note in notes if ctx.primary else ():
            tqdm.write(note)
        self.data_config = resolve_data_config(dict(img_size=args.img_size), model=model)
        check_input_size(model, tuple(self.data_config["input_size"]), args)
        set_transforms(train_set, val_set, self.data_config, args)
        check_readable(train_set, "training")
        check_readable(val_set, "validation")

        # From here on this process owns the run directory (until train() returns).
        self.output_dir = out = run_directory(args, resume_path, self.data_config["input_size"][-1], ctx)
        checkpoint_name = resume_path.name[: -len(".state.pt")] if resume_path is not None else "last"
        if resume_path is not None and not any(p.exists() for p in checkpoint_files(resume_path.parent,
                                                                                    checkpoint_name)):
            self._check_fresh_start(resume_path)  # before the lock file is made: a refusal leaves no trace
        lock_run_directory(out, ctx, stack)
        self.continuing = resume_path is not None and out.resolve() == resume_path.parent.resolve()
        existing = [f for f in RUN_FILES if (out / f).exists()]
        if existing and not self.continuing and not args.force:
            raise TrainError(f"{out} already holds a run ({', '.join(existing)}); pass --resume {out} to continue "
                             "it, another --experiment, or --force to replace it")
        self.checkpoint: TrainingCheckpoint | None = None
        if resume_path is not None:
            self.checkpoint = find_checkpoint(resume_path.parent, checkpoint_name)
            if self.checkpoint is None:
                self._check_fresh_start(resume_path)
                if ctx.primary:
                    tqdm.write(f"--resume {args.resume}: no complete checkpoint yet, starting the run from the "
                               "beginning")
        state = self.checkpoint.state if self.checkpoint is not None else None
        if state is not None:
            if state["model"] != args.model:
                raise TrainError(f"--resume {args.resume}: the checkpoint is of {state['model']}, not --model "
                                 f"{args.model}")
            problem = values_problem(self.checkpoint.weights) or values_problem(state.get("ema") or {})
            if problem:
                raise TrainError(f"--resume {args.resume}: {self.checkpoint.weights_path} is no good checkpoint: "
                                 f"{problem}")
            try:
                model.load_state_dict(self.checkpoint.weights)
            except RuntimeError as e:
                raise TrainError(f"--resume {args.resume}: the weights do not fit the model "
                                 f"({' '.join(str(e).split())[:300]})") from e
        # The checkpoint a diverged run can go back to (None: there is none).
        self.last_good: Path | None = None if self.checkpoint is None else self.checkpoint.weights_path
        model.to(device)
        if args.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model
        self.lr = _base_lr(args, ctx.world_size)
        self.optimizer = create_optimizer_v2(model, opt=args.opt, lr=self.lr, weight_decay=args.weight_decay,
                                             momentum=args.momentum)
        self.amp_dtype = getattr(torch, args.amp_dtype)
        # As timm's train.py: a loss scaler for float16 autocast only; otherwise plain backward and step.
        self.loss_scaler = NativeScaler(device.type) if args.amp and self.amp_dtype == torch.float16 else None
        self.ema = ModelEmaV3(model, decay=args.model_ema_decay) if args.model_ema else None

        if args.torchcompile:
            if hasattr(model, "set_compile"):
                model.set_compile(True, backend=args.torchcompile)
            else:
                model = torch.compile(model, backend=args.torchcompile)
        self.train_model: nn.Module = model
        if ctx.distributed:
            # with --sync-bn effidense synchronises the converted norms itself, exactly, in every memory mode
            self.train_model = ddp_model(model, device, args.sync_bn)

        self.sampler = ResumableSampler(train_set, ctx.world_size, ctx.rank, args.seed)
        self.train_loader = train_loader(train_set, self.sampler, args, device)
        self.eval_loader = eval_loader(val_set, ctx.rank, ctx.world_size, args, device)
        self.num_batches = self.sampler.num_samples // args.batch_size
        self.updates_per_epoch = math.ceil(self.num_batches / args.grad_accum_steps)
        self.scheduler, self.num_epochs = create_scheduler_v2(
            self.optimizer, sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
            decay_milestones=args.decay_milestones, cooldown_epochs=args.cooldown_epochs, decay_rate=args.decay_rate,
            min_lr=args.min_lr, warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs,
            plateau_mode="min" if args.eval_metric == "loss" else "max",
            step_on_epochs=not args.sched_on_updates, updates_per_epoch=self.updates_per_epoch)
        self.train_loss = LabelSmoothingCrossEntropy(args.smoothing) if args.smoothing else nn.CrossEntropyLoss()
        self.eval_loss = nn.CrossEntropyLoss()

        self.epoch, self.batch, self.step = 0, 0, 0
        self.epoch_loss = AverageMeter()  # the epoch's training loss so far (kept across a resume)
        self.best_metric: float | None = None
        self.best_epoch: int | None = None
        self.last_metrics: dict[str, float] = {}
        if state is not None:
            try:
                self._restore(state)
            except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as e:
                raise TrainError(f"--resume {args.resume}: the training state in {self.checkpoint.state_path} does "
                                 f"not fit this run ({short_error(e, kind=True)})") from None
        self.kill_after_step = int(os.environ.get(_KILL_AFTER_STEP_ENV, "0"))

    # --- checkpoints ---
    def _check_fresh_start(self, resume_path: Path) -> None:
        """Resuming is a way to continue a run, never one around the refusal to write over one: with no checkpoint
        to continue from, the run starts again only where that destroys nothing (or --force says to)."""
        problem = None if self.args.force else fresh_start_problem(self.output_dir)
        if problem:
            raise TrainError(
                f"--resume {self.args.resume}: {self.output_dir} has no checkpoint to continue from (no "
                f"{resume_path.name}), and starting the run again there would replace what it holds: {problem}. "
                "Restore the checkpoint, start a new run with another --experiment, or pass --force to start this "
                "one again, replacing them")

    def _restore(self, state: dict[str, Any]) -> None:
        args = self.args
        if state["batch"] and (state["batch_size"], state["world_size"], state["grad_accum_steps"]) != (
                args.batch_size, self.ctx.world_size, args.grad_accum_steps):
            raise TrainError(
                f"--resume {args.resume}: the checkpoint was taken mid-epoch with batch size {state['batch_size']} x "
                f"{state['world_size']} process(es) x {state['grad_accum_steps']} accumulation step(s); resume with "
                "the same values")
        saved_args = state.get("args") or {}
        changed = [f"--{key.replace('_', '-')} {saved_args[key]}" for key in _OPTIMIZER_ARGS
                   if key in saved_args and saved_args[key] != getattr(args, key)]
        if changed:
            # the optimizer's state (and its parameter groups) belong to the optimizer the run was started with
            raise TrainError(f"--resume {args.resume}: the run was trained with {' '.join(changed)}; resume with "
                             "the same optimizer settings (--resume RUN alone reuses the run's own arguments)")
        self.optimizer.load_state_dict(state["optimizer"])
        saved, current = state["schedule_args"], self._schedule_args()
        if saved == current:
            self.scheduler.load_state_dict(state["scheduler"])
        elif self.ctx.primary:  # as timm does: the schedule follows the new arguments from the resumed epoch on
            changes = ", ".join(f"{key} {saved.get(key)} -> {value}" for key, value in current.items()
                                if saved.get(key) != value)
            tqdm.write(f"schedule changed since the checkpoint ({changes}): following the new one from epoch "
                       f"{state['epoch']}")
        if self.loss_scaler is not None and state.get("scaler"):
            self.loss_scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            if state["ema"] is not None:
                self.ema.module.load_state_dict(state["ema"])
        self.epoch, self.batch, self.step = state["epoch"], state["batch"], state["step"]
        loss_sum, count = state["epoch_loss"]
        self.epoch_loss.sum, self.epoch_loss.count = loss_sum, count
        self.best_metric, self.best_epoch = state["best_metric"], state["best_epoch"]
        if args.sched_on_updates:
            self.scheduler.step_update(self.step)
        elif self.epoch > 0:
            self.scheduler.step(self.epoch)
        rngs = state["rng"]
        if len(rngs) == self.ctx.world_size:
            set_rng_state(rngs[self.ctx.rank])
        else:  # a different process count continues with freshly seeded per-rank RNGs
            random_seed(args.seed + self.epoch, self.ctx.rank)

    def _schedule_args(self) -> dict[str, Any]:
        keys = ("sched", "sched_on_updates", "epochs", "warmup_epochs", "warmup_lr", "min_lr", "decay_epochs",
                "decay_milestones", "decay_rate", "cooldown_epochs")
        return {"lr": self.lr, **{key: args_as_dict(self.args)[key] for key in keys}}

    def _gather_rng(self) -> list[dict[str, Any]] | None:
        if not self.ctx.distributed:
            return [rng_state()]
        gathered: list[Any] | None = [None] * self.ctx.world_size if self.ctx.primary else None
        dist.gather_object(rng_state(), gathered, dst=0)
        return gathered

    def _diverged(self, what: str, hint: str = "Lower --lr or add --warmup-epochs/--clip-grad") -> TrainingDiverged:
        return TrainingDiverged(
            f"{what}; stopped without saving. Last good checkpoint: {self.last_good or 'none (nothing was saved)'}. "
            f"{hint}")

    def check_finite(self) -> None:
        """Stop (on every rank alike: the weights are the same everywhere) before non-finite weights are saved."""
        if all_finite(self.model.state_dict()) and (self.ema is None or all_finite(self.ema.module.state_dict())):
            return
        params = {name for name, _ in self.model.named_parameters()}
        bad = [key for key, value in self.model.state_dict().items()
               if value.is_floating_point() and not torch.isfinite(value).all()]
        if bad and not any(key in params for key in bad):  # the parameters are fine: the statistics saw NaN/inf
            raise self._diverged(f"BatchNorm statistics became non-finite (NaN/inf) by epoch {self.epoch}, step "
                                 f"{self.step}, while the parameters stayed finite: {listing(bad)}",
                                 "Check the training images for NaN/inf values")
        raise self._diverged(f"the weights became non-finite (NaN/inf) by epoch {self.epoch}, step "
                             f"{self.step} (lr {self._current_lr():.4g})")

    def save_last(self) -> None:
        """Save last.* at the current position (every rank must call it: the RNG states are gathered)."""
        self.check_finite()
        rngs = self._gather_rng()
        if not self.ctx.primary:
            return
        args = self.args
        state = dict(
            model=args.model, epoch=self.epoch, batch=self.batch, step=self.step,
            epoch_loss=[self.epoch_loss.sum, self.epoch_loss.count],
            batch_size=args.batch_size, world_size=self.ctx.world_size, grad_accum_steps=args.grad_accum_steps,
            optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
            schedule_args=self._schedule_args(),
            scaler=self.loss_scaler.state_dict() if self.loss_scaler is not None else None,
            ema=self.ema.module.state_dict() if self.ema is not None else None,
            rng=rngs, best_metric=self.best_metric, best_epoch=self.best_epoch,
            args=args_as_dict(args))
        save_training_checkpoint(self.output_dir, "last", unwrap_model(self.model).state_dict(), state)
        self.last_good = self.output_dir / "last.safetensors"

    # --- epochs ---
    def _autocast(self) -> contextlib.AbstractContextManager:
        if not self.args.amp:
            return contextlib.nullcontext()
        return torch.autocast(self.ctx.device.type, dtype=self.amp_dtype)

    def _to_device(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = images.to(self.ctx.device, non_blocking=True)
        if self.args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, targets.to(self.ctx.device, non_blocking=True)

    def _current_lr(self) -> float:
        lrs = [group["lr"] for group in self.optimizer.param_groups]
        return sum(lrs) / len(lrs)

    def _batches(self) -> Any:
        """The training loader's batches; a sample that cannot be loaded ends the run with one line."""
        iterator = iter(self.train_loader)
        while True:
            try:
                yield next(iterator)
            except StopIteration:
                return
            except (OSError, RuntimeError) as e:
                lines = [line for line in str(e).splitlines() if line.strip()]
                raise TrainError(f"cannot load training images: {lines[-1] if lines else type(e).__name__}") from e

    def train_epoch(self) -> OrderedDict[str, float]:
        args, ctx, epoch = self.args, self.ctx, self.epoch
        accum = args.grad_accum_steps
        last_accum = self.num_batches % accum or accum
        first_short_batch = self.num_batches - last_accum
        self.sampler.set_epoch(epoch)
        self.sampler.skip(self.batch * args.batch_size)
        self.train_model.train()
        meter = self.epoch_loss
        # A progress bar on a terminal; plain log lines every --log-interval steps in a log file or pipe.
        bar = Progress(self.num_batches, f"epoch {epoch}", "it", enabled=ctx.primary, interval_s=None,
                       initial=self.batch)
        tick, tick_images = time.perf_counter(), 0
        if ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(ctx.device)
        for batch_idx, (images, targets) in enumerate(self._batches(), start=self.batch):
            images, targets = self._to_device(images, targets)
            steps_in_update = last_accum if batch_idx >= first_short_batch else accum
            update = (batch_idx + 1) % accum == 0 or batch_idx + 1 == self.num_batches
            no_sync = ctx.distributed and not update
            with self.train_model.no_sync() if no_sync else contextlib.nullcontext():  # type: ignore[operator]
                with self._autocast():
                    loss = self.train_loss(self.train_model(images), targets)
                loss_value = loss.detach().float()
                if ctx.distributed:
                    dist.all_reduce(loss_value)
                    loss_value /= ctx.world_size
                loss_value = loss_value.item()
                if not math.isfinite(loss_value):
                    bar.close()
                    raise self._diverged(f"loss is {loss_value} at epoch {epoch}, batch {batch_idx + 1} "
                                         f"(step {self.step}, lr {self._current_lr():.4g})")
                if self.loss_scaler is not None:  # float16 autocast: timm's NativeScaler scales, unscales, clips
                    self.loss_scaler(loss / steps_in_update, self.optimizer, clip_grad=args.clip_grad,
                                     parameters=self.model.parameters(), need_update=update)
                else:
                    (loss / steps_in_update).backward()
                    if update:
                        if args.clip_grad is not None:
                            dispatch_clip_grad(self.model.parameters(), args.clip_grad)
                        self.optimizer.step()
            meter.update(loss_value, images.shape[0])
            tick_images += images.shape[0] * ctx.world_size
            if update:
                self._after_update()
                self.batch = batch_idx + 1
                if (args.checkpoint_interval and self.step % args.checkpoint_interval == 0
                        and self.batch < self.num_batches):
                    self.save_last()
                if self.step == self.kill_after_step:
                    os.kill(os.getpid(), signal.SIGKILL)
            if (batch_idx + 1) % args.log_interval == 0 or batch_idx + 1 == self.num_batches:
                elapsed = time.perf_counter() - tick
                img_s = tick_images / max(elapsed, 1e-9)
                mem = (f"{torch.cuda.max_memory_allocated(ctx.device) / 2**30:.2f}GiB"
                       if ctx.device.type == "cuda" else None)
                note = (f"loss={meter.avg:.4f}, lr={self._current_lr():.3g}, img_s={img_s:.1f}"
                        + (f", mem={mem}" if mem else ""))
                # as timm's train.py logs: one line per --log-interval steps
                bar.log(f"train: epoch {epoch} [{batch_idx + 1:>{len(str(self.num_batches))}}/{self.num_batches} "
                        f"({100 * (batch_idx + 1) / self.num_batches:3.0f}%)]  loss {loss_value:.4f} "
                        f"(avg {meter.avg:.4f})  lr {self._current_lr():.3e}  {img_s:.1f} img/s"
                        + (f"  mem {mem}" if mem else ""), note, file=sys.stdout)
                tick, tick_images = time.perf_counter(), 0
            bar.advance()
        bar.close()
        return OrderedDict(loss=meter.avg)

    def _after_update(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.ema is not None:
            self.ema.update(self.model, step=self.step)
        self.scheduler.step_update(num_updates=self.step)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> OrderedDict[str, float]:
        """Validation loss, top-1 and top-5 accuracy (%), summed over all ranks' disjoint shares."""
        model.eval()
        loss, top1, top5 = AverageMeter(), AverageMeter(), AverageMeter()
        for images, targets in self.eval_loader:
            images, targets = self._to_device(images, targets)
            with self._autocast():
                output = model(images)
            output = output.float()
            n = images.shape[0]
            acc1, acc5 = accuracy(output, targets, topk=(1, min(5, output.shape[1])))
            loss.update(self.eval_loss(output, targets).item(), n)
            top1.update(round(acc1.item() * n / 100), 1)  # counts of correct images: exact sums
            top5.update(round(acc5.item() * n / 100), 1)
        loss_sum, correct1, correct5, count = reduce_sum([loss.sum, top1.sum, top5.sum, loss.count], self.ctx)
        if not count:
            raise TrainError("the validation set holds no images: there is nothing to evaluate")
        return OrderedDict(loss=loss_sum / count, top1=100 * correct1 / count, top5=100 * correct5 / count)

    def _evaluation_failed(self, metrics: OrderedDict[str, float], which: str) -> TrainError | None:
        """A non-finite validation loss is a failed evaluation (its accuracy means nothing): the error that stops
        the run before anything of this epoch is reported or saved."""
        if all(math.isfinite(value) for value in metrics.values()):
            return None
        return TrainingDiverged(
            f"the evaluation of {which} failed at epoch {self.epoch}: eval loss {metrics['loss']} (the model's "
            "outputs are not finite in eval mode: its weights or BatchNorm running statistics have gone bad); "
            f"stopped without saving this epoch. Last good checkpoint: {self.last_good or 'none (nothing was saved)'}")

    def fit(self) -> dict[str, Any]:
        args, ctx = self.args, self.ctx
        if ctx.distributed:
            dist.barrier()  # every rank has read the checkpoint before rank 0 may rename its files
        if ctx.primary:
            prepare_run_directory(self.output_dir, self.checkpoint, self.continuing,
                                  replace=args.force and not (self.continuing and self.checkpoint is not None))
            if self.continuing and self.checkpoint is not None:
                self.last_good = self.output_dir / "last.safetensors"
            write_file(self.output_dir / "args.yaml", lambda tmp: Path(tmp).write_text(args_to_yaml(args)))
            trim_summary(self.output_dir / "summary.csv", self.epoch)
            tqdm.write(f"training {args.model} on {ctx.world_size} process(es) ({ctx.device.type}), epochs 0 to "
                       f"{self.num_epochs - 1} (counted from 0, as in summary.csv), {self.num_batches} batches/epoch, "
                       f"writing {self.output_dir}")
            if self.checkpoint is not None:
                tqdm.write(f"resuming at epoch {self.epoch}, step {self.step} ({self.checkpoint.weights_path.name} "
                           f"of {self.checkpoint.weights_path.parent})")
        if self.epoch >= self.num_epochs and ctx.primary:
            tqdm.write(f"nothing to do: the run has finished its {self.num_epochs} epochs (--epochs extends it)")
        while self.epoch < self.num_epochs:
            started = time.perf_counter()
            train_metrics = self.train_epoch()
            self.check_finite()
            lr = self._current_lr()
            if ctx.distributed and not args.sync_bn:
                distribute_bn(self.model, ctx.world_size, reduce=True)
            eval_metrics = self.evaluate(self.model)
            failed = self._evaluation_failed(eval_metrics, "the model")
            if self.ema is not None:
                if ctx.distributed:
                    distribute_bn(self.ema.module, ctx.world_size, reduce=True)
                eval_metrics = self.evaluate(self.ema.module)  # timm picks the best on the EMA's metrics
                failed = failed or self._evaluation_failed(eval_metrics, "the EMA weights")
            if failed:
                raise failed
            self.check_finite()  # distribute_bn averaged the BN statistics
            self.scheduler.step(self.epoch + 1, eval_metrics[args.eval_metric])
            improved = _is_better(eval_metrics[args.eval_metric], self.best_metric, args.eval_metric)
            if improved:
                self.best_metric, self.best_epoch = eval_metrics[args.eval_metric], self.epoch
            if ctx.primary:
                # The summary row goes first: a resume from the previous checkpoint drops it again (trim_summary).
                append_summary(self.output_dir / "summary.csv", self.epoch, train_metrics, eval_metrics, lr)
                if improved:
                    best_model = self.ema.module if self.ema is not None else self.model
                    save_weights(self.output_dir / "model_best.safetensors", unwrap_model(best_model).state_dict(),
                                 {"epoch": str(self.epoch), args.eval_metric: str(self.best_metric)})
                tqdm.write(f"epoch {self.epoch}: train_loss {train_metrics['loss']:.4f}, "
                           f"eval_loss {eval_metrics['loss']:.4f}, top1 {eval_metrics['top1']:.2f}, "
                           f"top5 {eval_metrics['top5']:.2f}, lr {lr:.4g} ({time.perf_counter() - started:.1f}s)")
            self.epoch, self.batch = self.epoch + 1, 0
            self.epoch_loss.reset()
            self.last_metrics = dict(eval_metrics)
            self.save_last()
        return dict(output_dir=self.output_dir, best_metric=self.best_metric, best_epoch=self.best_epoch,
                    eval_metrics=self.last_metrics, step=self.step, epochs=self.num_epochs, rank=ctx.rank)


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Run the built-in trainer with parsed arguments (see :func:`~effidense.train.parse_args`).

    Returns the run directory, best metric and epoch, the last epoch's validation metrics, the optimizer step count
    and this process's rank.
    Raises :class:`TrainError` for bad input and :class:`TrainingDiverged` when the loss or the weights stop being
    finite.
    """
    ctx = init_processes(args)
    trainer = None
    try:
        with contextlib.ExitStack() as stack:  # holds the run directory's lock
            trainer = _Trainer(args, ctx, stack)
            try:
                return trainer.fit()
            except KeyboardInterrupt:  # files are written with Ctrl-C held back: none is left half-written
                out = trainer.output_dir
                raise TrainingInterrupted(f"interrupted (Ctrl-C); {out} keeps its last complete checkpoint: continue "
                                          f"with --resume {out}") from None
    finally:
        if ctx.distributed and dist.is_initialized():
            trainer = None  # its DDP model holds the process group too (destroy_process_group says why that matters)
            destroy_process_group()
