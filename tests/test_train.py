"""tools/train.py and effidense.train: wrapper mode, built-in trainer, DDP, resume after SIGKILL, NaN stop, digits."""
from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from conftest import TRAIN_TINY, load_tool
from PIL import Image
from safetensors.torch import load_file

import effidense  # noqa: F401  (registers effi_* with timm)
from effidense.train import TrainError, build_model, load_training_checkpoint, parse_args, resolve_resume
from effidense.train.checkpoint import save_training_checkpoint, save_weights
from effidense.train.data import SyntheticDataset
from effidense.train.distributed import Processes, check_sync_bn

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "train.py"
tool = load_tool("train")

TINY = TRAIN_TINY
SYNTHETIC = ["--dataset", "synthetic", "--img-size", "8", "-b", "8", "--train-num-samples", "64",
             "--val-num-samples", "21", "-j", "0", "--warmup-epochs", "0", "--log-interval", "3"]

STAND_IN = '''
import argparse, json, os, sys
import timm
parser = argparse.ArgumentParser()
parser.add_argument("--model")
parser.add_argument("--record")
parser.add_argument("--exit-code", type=int, default=0)
parser.add_argument("--lr", type=float)
args = parser.parse_args()
model = timm.create_model(args.model, num_classes=3)
record = dict(argv=sys.argv, name=__name__, model=type(model).__module__ + "." + type(model).__name__,
              num_classes=model.num_classes, rank=os.environ.get("RANK"), world=os.environ.get("WORLD_SIZE"))
with open(args.record + os.environ.get("RANK", ""), "w") as f:
    json.dump(record, f)
sys.exit(args.exit_code)
'''


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["GLOO_SOCKET_IFNAME"] = "lo"  # gloo stays on the loopback interface
    env.pop("EFFIDENSE_TIMM_SCRIPT", None)
    # The same thread count as this process (conftest: one): float reductions split by thread, and a resumed run
    # is compared bit for bit with one that ran here.
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _summary(run: Path) -> list[dict[str, str]]:
    with open(run / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def _write_digits(root: Path, per_class: tuple[int, int] | None = None, size: int = 16) -> Path:
    """scikit-learn's 8x8 digits as an ImageFolder of upscaled PNGs: a stratified 80/20 train/val split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    train_idx, val_idx = train_test_split(np.arange(len(digits.target)), test_size=0.2, stratify=digits.target,
                                          random_state=0)
    for split, indices, limit in (("train", train_idx, per_class and per_class[0]),
                                  ("val", val_idx, per_class and per_class[1])):
        taken: dict[int, int] = {}
        for i in indices:
            label = int(digits.target[i])
            if limit and taken.get(label, 0) >= limit:
                continue
            taken[label] = taken.get(label, 0) + 1
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (digits.images[i] * (255 / 16)).astype(np.uint8)
            Image.fromarray(pixels, "L").resize((size, size), Image.BILINEAR).save(folder / f"{i}.png")
    return root


# --- wrapper mode ---

@pytest.fixture
def stand_in(tmp_path: Path) -> Path:
    script = tmp_path / "train.py"  # named as timm's own
    script.write_text(STAND_IN)
    return script


WRAPPER = [sys.executable, "-m", "effidense", "timm"]  # `effidense timm SCRIPT ARGS`, the one route


def test_wrapper_runs_script_as_main_with_effidense_registered(stand_in: Path, tmp_path: Path) -> None:
    record = tmp_path / "record.json"
    # A fresh interpreter: only the wrapper can have imported effidense before the script's create_model.
    proc = subprocess.run([*WRAPPER, str(stand_in), "--model", "effi_densenet40_k12",
                           "--record", str(record), "--lr", "0.3", "--exit-code", "3"],
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    got = json.loads(record.read_text())
    assert got["argv"] == [str(stand_in), "--model", "effi_densenet40_k12", "--record", str(record), "--lr", "0.3",
                           "--exit-code", "3"]
    assert got["name"] == "__main__"
    assert got["model"] == "effidense.densenet.DenseNet" and got["num_classes"] == 3


def test_wrapper_in_process_and_its_errors(stand_in: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from effidense.cli import timm as timm_command

    record = tmp_path / "record.json"
    argv_before = list(sys.argv)
    assert timm_command.main([str(stand_in), "--model", "effi_densenet_bc100_k12", "--record", str(record)]) == 0
    assert sys.argv == argv_before
    got = json.loads(record.read_text())
    assert got["argv"][1:] == ["--model", "effi_densenet_bc100_k12", "--record", str(record)]
    assert timm_command.main([str(tmp_path / "missing.py")]) == 1
    assert "no such file" in capsys.readouterr().err


def test_train_takes_no_timm_script(stand_in: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # one route to timm's scripts, `effidense timm`: `effidense train --timm-script` is gone
    with pytest.raises(SystemExit) as exc:
        parse_args(["--timm-script", str(stand_in)])
    assert exc.value.code == 2 and "--timm-script" in capsys.readouterr().err


@pytest.mark.slow
def test_wrapper_under_torchrun(stand_in: Path, tmp_path: Path) -> None:
    record = tmp_path / "rank"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", str(_free_port()), "-m", "effidense", "timm", str(stand_in),
                           "--model", "effi_densenet40_k12", "--record", str(record)],
                          env=_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads((tmp_path / f"rank{r}").read_text()) for r in range(2)]
    assert [(r["rank"], r["world"]) for r in records] == [("0", "2"), ("1", "2")]
    assert all(r["model"] == "effidense.densenet.DenseNet" for r in records)


# --- built-in mode: arguments and early errors ---

def test_unsupported_flag_points_to_wrapper_mode(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        tool.main([*SYNTHETIC, "--mixup", "0.2"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--mixup" in err and "effidense timm" in err


def test_config_file_sets_defaults_and_flags_override(tmp_path: Path) -> None:
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump({"batch-size": 32, "lr": 0.2, "sched": "multistep", "decay_milestones": [3, 6],
                                      "model_kwargs": {"growth_rate": 4}}))
    args = parse_args(["--config", str(config), "--lr", "0.05"])
    assert (args.batch_size, args.lr, args.sched, args.decay_milestones) == (32, 0.05, "multistep", [3, 6])
    assert args.model_kwargs == {"growth_rate": 4}
    config.write_text(yaml.safe_dump({"mixup": 0.2}))
    with pytest.raises(TrainError, match="mixup.*effidense timm"):
        parse_args(["--config", str(config)])


def test_model_flags_memory_mode_and_grad_checkpointing() -> None:
    args = parse_args([*TINY, "--memory", "frugal"])
    assert build_model(args, 10).memory == "frugal"
    args = parse_args([*TINY, "memory=plain", "--grad-checkpointing"])
    assert args.model_kwargs["memory"] == "plain"
    assert build_model(args, 10).memory == "frugal"
    with pytest.raises(TrainError, match="contradicts"):
        build_model(parse_args([*TINY, "--memory", "plain", "--grad-checkpointing"]), 10)
    with pytest.raises(TrainError, match="memory modes"):
        build_model(parse_args(["--model", "resnet18", "--memory", "frugal"]), 10)


def test_bn_momentum_and_bn_eps_set_every_norm_as_timms_train_py_does(capsys) -> None:
    """timm's train.py flags --bn-momentum and --bn-eps reach every BatchNorm; bad values and the same setting given
    twice (as timm's create_model would fail on) are one line each."""
    model = build_model(parse_args([*TINY, "--bn-momentum", "0.05", "--bn-eps", "1e-3"]), 10)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and all((m.momentum, m.eps) == (0.05, 1e-3) for m in norms)
    assert {m.momentum for m in build_model(parse_args(TINY), 10).modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)} == {0.1}
    with pytest.raises(TrainError, match=r"^--bn-momentum and --model-kwargs bn_momentum=\.\.\. both set it"):
        parse_args([*TINY, "bn_momentum=0.2", "--bn-momentum", "0.1"])
    for flag, value, need in (("--bn-eps", "0", "(0, 1]"), ("--bn-momentum", "1.5", "[0, 1]")):
        with pytest.raises(SystemExit):
            parse_args([*TINY, flag, value])
        assert f"argument {flag}: must be a number in {need}, got {value}" in capsys.readouterr().err


@pytest.mark.parametrize("layout, message", [
    (None, "no such directory"),
    ({}, "no training split"),
    ({"train/a": 0, "val/a": 0}, "no images found"),
    ({"train/a": 1}, "no validation split"),
    ({"train": 1, "val": 1}, "one sub-folder per class"),
    ({"train/a": 1, "val/a": 1, "val/b": 1}, "not in"),
])
def test_bad_data_dir_fails_before_any_model_is_built(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str], layout, message) -> None:
    root = tmp_path / "data"
    if layout is not None:
        root.mkdir()
        for folder, images in layout.items():
            (root / folder).mkdir(parents=True, exist_ok=True)
            for i in range(images):
                Image.new("RGB", (8, 8)).save(root / folder / f"{i}.png")

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the data was checked")

    monkeypatch.setattr(timm, "create_model", no_model)
    assert tool.main([*TINY, "--data-dir", str(root), "--output", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


def test_cifar_is_never_downloaded_unless_asked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert tool.main([*TINY, "--dataset", "torch/cifar10", "--data-dir", str(tmp_path)]) == 1
    assert "--dataset-download" in capsys.readouterr().err


def test_sync_bn_on_the_cpu_under_torchrun_takes_effidense_models_only() -> None:
    """DDP refuses SyncBatchNorm modules on the CPU when it wraps, and torch's own do not run there: effidense's
    norms are converted after wrapping (``ddp_model``, tests/test_syncbn.py), another model's are refused in one
    line before the run starts."""
    ranks = Processes(torch.device("cpu"), 0, 2, distributed=True)
    check_sync_bn(build_model(parse_args([*TINY, "--sync-bn"]), 10), ranks, "TINY")
    other = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    check_sync_bn(other, Processes(torch.device("cpu"), 0, 1, distributed=False), "resnet")  # one process: no sync
    with pytest.raises(TrainError, match="--sync-bn on the CPU: resnet's BatchNorm 1 would become torch's"):
        check_sync_bn(other, ranks, "resnet")


def test_sync_bn_trains_in_one_process_on_the_cpu(tmp_path: Path) -> None:
    assert tool.main([*TINY, *SYNTHETIC, "--device", "cpu", "--sync-bn", "--epochs", "1", "--output",
                      str(tmp_path), "--experiment", "sync"]) == 0
    assert [row["epoch"] for row in _summary(tmp_path / "sync")] == ["0"]


# --- built-in mode: training ---

def test_synthetic_run_writes_summary_checkpoints_and_args(tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = [*TINY, *SYNTHETIC, "--epochs", "2", "--output", str(out), "--experiment", "run", "--model-ema",
            "--amp", "--amp-dtype", "bfloat16", "--channels-last", "--grad-accum-steps", "3", "--sched", "multistep",
            "--decay-milestones", "1", "--lr", "0.1", "--opt", "sgd"]
    assert tool.main(argv) == 0
    run = out / "run"
    rows = _summary(run)
    assert [row["epoch"] for row in rows] == ["0", "1"]
    assert set(rows[0]) == {"epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "lr"}
    assert [float(row["lr"]) for row in rows] == pytest.approx([0.1, 0.01])  # multistep: x0.1 from epoch 1
    weights, state = load_training_checkpoint(resolve_resume(str(run)))
    assert (state["epoch"], state["batch"], state["step"]) == (2, 0, 2 * 3)  # 8 batches, accumulated 3+3+2
    group = state["optimizer"]["param_groups"][0]
    assert group["nesterov"] and group["momentum"] == 0.9  # timm's 'sgd' is SGD with Nesterov momentum
    assert state["ema"] is not None and len(state["rng"]) == 1
    model = timm.create_model("effi_densenet_bc100_k12", num_classes=10, block_config=(2, 2), growth_rate=4,
                              num_init_features=8)
    model.load_state_dict(weights)
    model.load_state_dict(load_file(run / "model_best.safetensors"))
    assert not list(run.glob("*.tmp"))
    # args.yaml reads back as a config; starting over in the same directory needs --resume or --force
    args = parse_args(["--config", str(run / "args.yaml")])
    assert args.grad_accum_steps == 3 and args.model_kwargs["block_config"] == [2, 2]
    with pytest.raises(TrainError, match="already holds a run"):
        effidense.train.train(args)
    args.force, args.epochs = True, 1
    assert effidense.train.train(args)["step"] == 3
    assert [row["epoch"] for row in _summary(run)] == ["0"]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "out" / "nan"
    # Epoch 1 runs at the tiny warm-up lr and is saved; epoch 2's lr of 1e12 blows the weights up.
    argv = [*TINY, *SYNTHETIC, "--epochs", "4", "--warmup-epochs", "1", "--warmup-lr", "1e-3", "--lr", "1e12",
            "--smoothing", "0", "--output", str(tmp_path / "out"), "--experiment", "nan"]
    assert tool.main(argv) == 1
    err = capsys.readouterr().err
    assert "error: loss is" in err and "at epoch 1," in err and str(run / "last.safetensors") in err
    weights, state = load_training_checkpoint(resolve_resume(str(run)))
    assert (state["epoch"], state["batch"]) == (1, 0)
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert len(_summary(run)) == 1


def test_checkpoint_pair_survives_a_kill_between_its_two_files(tmp_path: Path) -> None:
    weights = {"w": torch.zeros(2)}
    rest = dict(model="m", epoch_loss=[0.0, 0], batch_size=8, world_size=1, grad_accum_steps=1, optimizer={},
                scheduler={}, schedule_args={}, rng=[], best_metric=None, best_epoch=None, ema=None)
    position = dict(epoch=0, batch=2, step=2, **rest)
    save_training_checkpoint(tmp_path, "last", weights, position)
    # A kill after the weights of step 4 were moved into place but before their state file was:
    new = dict(epoch=0, batch=4, step=4, **rest)
    torch.save({"format": "effidense-train-state/1", **new}, tmp_path / "last.state.pt.tmp")
    save_weights(tmp_path / "last.safetensors", {"w": torch.ones(2)}, {"position": "0/4/4"})
    loaded, state = load_training_checkpoint(tmp_path / "last.state.pt")
    assert state["step"] == 4 and torch.equal(loaded["w"], torch.ones(2))
    (tmp_path / "last.state.pt.tmp").unlink()
    with pytest.raises(TrainError, match="no matching training state"):
        load_training_checkpoint(tmp_path / "last.state.pt")


# --- resume after SIGKILL ---

@pytest.fixture(scope="module")
def small_digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_digits(tmp_path_factory.mktemp("digits_small"), per_class=(10, 3))


def _resume_args(data: Path, out: Path, experiment: str) -> list[str]:
    # Real images with timm's random augmentation, dropout inside the dense layers and a data-loading worker:
    # every source of randomness a resume has to reproduce.
    return [*TINY, "proj_drop_rate=0.2", "--data-dir", str(data), "--img-size", "16",
            "-b", "16", "--epochs", "3", "--warmup-epochs", "1", "--warmup-lr", "0.01", "--lr", "0.05", "-j", "1",
            "--log-interval", "100", "--model-ema", "--model-ema-decay", "0.9", "--output", str(out),
            "--experiment", experiment]


@pytest.fixture(scope="module")
def unbroken_run(small_digits: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("unbroken")
    assert tool.main(_resume_args(small_digits, out, "ref")) == 0
    return out / "ref"


@pytest.mark.parametrize("interval, kill_after_step, resumes_at", [
    (4, 10, (1, 2, 8)),  # 6 batches/epoch: mid-epoch checkpoint at step 8 (epoch 2, batch 2), 9-10 are lost
    (0, 9, (1, 0, 6)),  # epoch-end checkpoints only: the interrupted epoch restarts from its beginning
])
def test_resume_after_sigkill_equals_unbroken_run(small_digits: Path, unbroken_run: Path, tmp_path: Path,
                                                  interval: int, kill_after_step: int, resumes_at) -> None:
    argv = [*_resume_args(small_digits, tmp_path, "killed"), "--checkpoint-interval", str(interval)]
    env = {**_env(), "EFFIDENSE_TEST_KILL_AFTER_STEP": str(kill_after_step)}
    # Its output to a file, not a pipe: the loader worker the kill orphans holds a pipe open for up to 5 s more (until
    # it sees its parent gone), and reading the pipe to its end would wait for it.
    log = tmp_path / "killed.log"
    with open(log, "w") as out:
        proc = subprocess.run([sys.executable, str(TOOL), *argv], env=env, stdout=out, stderr=subprocess.STDOUT,
                              timeout=300)
    assert proc.returncode == -signal.SIGKILL, log.read_text()[-3000:]
    run = tmp_path / "killed"
    _, state = load_training_checkpoint(resolve_resume(str(run)))
    assert (state["epoch"], state["batch"], state["step"]) == resumes_at

    # Resumed in-process and without a loader worker: the samples' augmentation does not depend on either.
    assert tool.main([*argv, "--resume", str(run), "-j", "0"]) == 0
    for name in ("last.safetensors", "model_best.safetensors"):
        expected, got = load_file(unbroken_run / name), load_file(run / name)
        assert expected.keys() == got.keys()
        assert all(torch.equal(expected[k], got[k]) for k in expected), name
    assert _summary(run) == _summary(unbroken_run)
    _, final = load_training_checkpoint(resolve_resume(str(run)))
    _, reference = load_training_checkpoint(resolve_resume(str(unbroken_run)))
    assert final["ema"].keys() == reference["ema"].keys()
    assert all(torch.equal(final["ema"][k], reference["ema"][k]) for k in final["ema"])


# --- distributed ---

@pytest.mark.slow
@pytest.mark.parametrize("sync_bn", [[], ["--sync-bn"]], ids=["", "sync-bn"])
def test_two_process_ddp_on_gloo(tmp_path: Path, sync_bn: list[str]) -> None:
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", str(_free_port()), str(TOOL), *TINY, *SYNTHETIC, *sync_bn,
                           "--epochs", "2", "--output", str(out), "--experiment", "ddp", "--checkpoint-interval", "3"],
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = out / "ddp"
    rows = _summary(run)
    assert [row["epoch"] for row in rows] == ["0", "1"]  # one writer
    assert proc.stdout.count("done: best") == 1
    weights, state = load_training_checkpoint(resolve_resume(str(run)))
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert state["step"] == 2 * (64 // 2 // 8)  # the sampler splits 64 images over 2 ranks: 4 batches each
    # The logged validation metrics cover the whole validation set once, over both ranks' shares:
    model = timm.create_model("effi_densenet_bc100_k12", num_classes=10, block_config=(2, 2), growth_rate=4,
                              num_init_features=8)
    model.load_state_dict(weights)
    model.eval()
    val = SyntheticDataset(21, 10, seed=43)
    val.input_size = (3, 8, 8)
    images = torch.stack([val[i][0] for i in range(21)])
    targets = torch.tensor([val[i][1] for i in range(21)])
    with torch.no_grad():
        logits = model(images)
    assert float(rows[-1]["eval_loss"]) == pytest.approx(torch.nn.functional.cross_entropy(logits, targets).item(),
                                                         rel=1e-5)
    assert float(rows[-1]["eval_top1"]) == pytest.approx(100 * (logits.argmax(1) == targets).float().mean().item())


# --- real data ---

@pytest.mark.slow
def test_digits_reach_95_percent(tmp_path: Path) -> None:
    """A small effi DenseNet-BC on scikit-learn's real 8x8 digits (upscaled to 16x16 PNGs) with the built-in trainer."""
    data = _write_digits(tmp_path / "digits")
    out = tmp_path / "out"
    argv = ["--data-dir", str(data), "--model", "effi_densenet_bc100_k12", "--model-kwargs", "block_config=(3,3,3)",
            "--img-size", "16", "-b", "32", "--epochs", "4", "--lr", "0.1", "--warmup-epochs", "0",
            "--weight-decay", "1e-4", "--no-aug", "-j", "0", "--output", str(out), "--experiment", "digits"]
    started = time.perf_counter()
    assert tool.main(argv) == 0
    seconds = time.perf_counter() - started
    rows = _summary(out / "digits")
    print(f"\ndigits: val top1 per epoch {[round(float(r['eval_top1']), 2) for r in rows]}, {seconds:.1f}s")

    # Check the saved best weights independently: torchvision's ImageFolder and timm's eval transform.
    from timm.data import create_transform, resolve_data_config
    from torchvision.datasets import ImageFolder

    model = timm.create_model("effi_densenet_bc100_k12", num_classes=10, block_config=(3, 3, 3))
    model.load_state_dict(load_file(out / "digits" / "model_best.safetensors"))
    model.eval()
    config = resolve_data_config(dict(img_size=16), model=model)
    val = ImageFolder(str(data / "val"), transform=create_transform(**config))
    loader = torch.utils.data.DataLoader(val, batch_size=128)
    with torch.no_grad():
        correct = sum((model(x).argmax(1) == y).sum().item() for x, y in loader)
    accuracy = 100 * correct / len(val)
    print(f"digits: model_best top1 {accuracy:.2f}% on {len(val)} validation images")
    assert len(val) == 360
    assert accuracy >= 95.0
    assert max(float(r["eval_top1"]) for r in rows) == pytest.approx(accuracy)
