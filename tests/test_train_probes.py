"""The trainer's answers to adversarial input: weights files read safely, one line for every
failure, nothing half-written left behind."""
from __future__ import annotations

import csv
import os
import pickle
import random
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from conftest import TRAIN_SYNTHETIC, TRAIN_TINY, load_tool, one_line_error
from safetensors.torch import save_file

import effidense  # noqa: F401  (registers effi_* with timm)
from effidense.train import TrainError, build_model, parse_args, trainer
from effidense.train.checkpoint import find_checkpoint

ROOT = Path(__file__).resolve().parents[1]
tool = load_tool("train")

TINY, SYNTHETIC = TRAIN_TINY, TRAIN_SYNTHETIC


def _tiny_weights(num_classes: int = 10) -> dict[str, torch.Tensor]:
    model = timm.create_model("effi_densenet_bc100_k12", num_classes=num_classes, block_config=(2, 2), growth_rate=4,
                              num_init_features=8)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class _Payload:
    """Unpickling this runs code: it creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


# --- weights files: read by effidense's safe loader, whatever timm's version ---

@pytest.mark.parametrize("flag", ["--pretrained-path", "--initial-checkpoint"])
def test_a_pickle_payload_in_a_weights_file_never_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       flag: str) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as f:
        torch.save({"state_dict": _tiny_weights(), "extra": _Payload(marker)}, f, pickle_module=pickle)
    assert not marker.exists()
    argv = [*TINY, *SYNTHETIC, "--epochs", "1", flag, str(evil), "--output", str(tmp_path / "out")]
    assert tool.main(argv) == 1
    line = one_line_error(capsys.readouterr().err)
    assert line.startswith(f"error: {flag} {evil}:") and "unsafe" in line
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag", ["--pretrained-path", "--initial-checkpoint"])
def test_a_truncated_safetensors_weights_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          flag: str) -> None:
    weights = tmp_path / "w.safetensors"
    save_file(_tiny_weights(), weights)
    os.truncate(weights, weights.stat().st_size // 2)
    assert tool.main([*TINY, *SYNTHETIC, "--epochs", "1", flag, str(weights), "--output", str(tmp_path / "out")]) == 1
    line = one_line_error(capsys.readouterr().err)
    assert line.startswith(f"error: {flag} {weights}:") and "truncated" in line


def test_a_nan_batchnorm_buffer_in_the_initial_weights_is_named(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    weights = _tiny_weights()
    weights["features.denseblock1.denselayer1.norm1.running_mean"][0] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_file(weights, path)
    assert tool.main([*TINY, *SYNTHETIC, "--epochs", "1", "--initial-checkpoint", str(path),
                      "--output", str(tmp_path / "out")]) == 1
    line = one_line_error(capsys.readouterr().err)
    assert "features.denseblock1.denselayer1.norm1.running_mean" in line and "NaN/inf" in line and "--lr" not in line


def test_weights_files_still_load(tmp_path: Path) -> None:
    weights = _tiny_weights(num_classes=10)
    path = tmp_path / "w.safetensors"
    save_file({f"module.{k}": v for k, v in weights.items()}, path)  # a DDP checkpoint's prefix is understood
    model = build_model(parse_args([*TINY, "--initial-checkpoint", str(path)]), 10)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    # --pretrained-path: the file's features, a new classifier for another number of classes
    model = build_model(parse_args([*TINY, "--pretrained-path", str(path)]), 3)
    state = model.state_dict()
    assert state["classifier.weight"].shape == (3, weights["classifier.weight"].shape[1])
    assert all(torch.equal(state[k], v) for k, v in weights.items() if not k.startswith("classifier."))


# --- flags refused up front ---

@pytest.mark.parametrize("flag, value", [("--lr", "1e39"), ("--momentum", "nan"), ("--weight-decay", "inf"),
                                         ("--warmup-lr", "nan"), ("--min-lr", "inf"), ("--clip-grad", "nan")])
def test_non_finite_or_overflowing_hyperparameters_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                               flag: str, value: str) -> None:
    with pytest.raises(SystemExit) as exc:
        tool.main([*TINY, *SYNTHETIC, flag, value, "--output", str(tmp_path / "out")])
    assert exc.value.code == 2
    line = one_line_error(capsys.readouterr().err)
    assert f"argument {flag}: must be a finite number" in line and f"got {value}" in line
    assert not (tmp_path / "out").exists()


def test_a_config_file_is_checked_like_the_command_line(tmp_path: Path) -> None:
    config = tmp_path / "cfg.yaml"
    config.write_text("momentum: .nan\n")
    with pytest.raises(TrainError, match=r"--momentum nan: must be a finite number >= 0"):
        parse_args(["--config", str(config)])


# --- resuming ---

@pytest.fixture
def finished_run(tmp_path: Path) -> Path:
    argv = [*TINY, *SYNTHETIC, "--epochs", "1", "--model-ema", "--output", str(tmp_path), "--experiment", "run"]
    assert tool.main(argv) == 0
    return tmp_path / "run"


def test_resume_alone_takes_the_run_s_own_arguments(finished_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert tool.main(["--resume", str(finished_run), "--epochs", "2"]) == 0  # no --data-dir, --model, ... given
    out = capsys.readouterr().out
    assert "resuming at epoch 1, step 2" in out
    with open(finished_run / "summary.csv", newline="") as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == ["0", "1"]
    args = parse_args(["--config", str(finished_run / "args.yaml")])
    assert args.model_ema and args.epochs == 2 and args.dataset == "synthetic"  # the run's flags, and the new one


@pytest.mark.parametrize("flags, named", [(["--opt", "adamw"], "--opt sgd"),
                                          (["--weight-decay", "0"], "--weight-decay 2e-05"),
                                          (["--momentum", "0.5"], "--momentum 0.9")])
def test_resume_with_another_optimizer_is_one_line(finished_run: Path, capsys: pytest.CaptureFixture[str],
                                                   flags: list[str], named: str) -> None:
    before = {p.name: p.read_bytes() for p in finished_run.iterdir()}
    capsys.readouterr()
    assert tool.main(["--resume", str(finished_run), "--epochs", "2", *flags]) == 1
    line = one_line_error(capsys.readouterr().err)
    assert line.startswith(f"error: --resume {finished_run}: the run was trained with {named};")
    assert {p.name: p.read_bytes() for p in finished_run.iterdir()} == before


@pytest.mark.parametrize("edit, message", [
    (lambda state: state.pop("step"), "lacks step"),
    (lambda state: state.update(epoch="one"), "epoch (str)"),
    (lambda state: state.update(optimizer={"state": {}, "param_groups": "x"}), "does not fit this run"),
])
def test_a_hand_edited_state_file_is_one_line(finished_run: Path, capsys: pytest.CaptureFixture[str], edit,
                                              message: str) -> None:
    path = finished_run / "last.state.pt"
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)
    capsys.readouterr()
    assert tool.main(["--resume", str(finished_run), "--epochs", "2"]) == 1
    line = one_line_error(capsys.readouterr().err)
    assert str(path) in line and message in line


def test_random_bytes_are_called_corrupt_not_unsafe(finished_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = finished_run / "last.state.pt"
    path.write_bytes(random.Random(0).randbytes(4096))  # its first byte is no pickle opcode
    capsys.readouterr()
    assert tool.main(["--resume", str(finished_run), "--epochs", "2"]) == 1
    line = one_line_error(capsys.readouterr().err)
    assert f"{path}: corrupt or truncated" in line
    assert "pickle" not in line and "unsafe" not in line and "global" not in line


def _kill_processes_naming(marker: str) -> None:
    """Kill every process whose command line names ``marker``: ranks a killed torchrun left behind, which would hold
    its pipes open (Linux /proc)."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if marker in cmdline.read_bytes().decode(errors="replace"):
                os.kill(int(cmdline.parent.name), signal.SIGKILL)
        except (OSError, ValueError):
            pass  # gone meanwhile, or not ours


@pytest.mark.slow
def test_errors_under_torchrun_are_printed_once(tmp_path: Path) -> None:
    """Rank 0 prints the error, however much sooner another rank meets it (a rank that exited first would have
    torchrun end rank 0 before it printed)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    with socket.socket() as s, socket.socket() as t:
        s.bind(("127.0.0.1", 0))
        t.bind(("127.0.0.1", 0))
        ports = [s.getsockname()[1], t.getsockname()[1]]
    # argparse's error, then a TrainError: two launches at once, each with its own port; the output directory names
    # this test's launches in every rank's command line
    marker = str(tmp_path / "out")
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                               "--master_addr", "127.0.0.1", "--master_port", str(port),
                               str(ROOT / "tools" / "train.py"), *TINY, "--output", marker, *args],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for port, args in zip(ports, (["--lr", "nan"], ["--data-dir", str(tmp_path / "missing")]), strict=True)]
    try:
        for proc in procs:
            _, err = proc.communicate(timeout=180)
            assert proc.returncode != 0
            ours = [line for line in err.splitlines() if "error: " in line and "elastic" not in line]
            assert len(ours) == 1, err[-3000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        _kill_processes_naming(marker)
        for proc in procs:
            proc.communicate(timeout=60)


# --- writes that fail or are interrupted ---

def _limit_file_size(limit: int):
    def apply() -> None:  # in the child: writes past `limit` bytes fail (EFBIG), as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def _leftovers(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if p.name.endswith(".tmp"))


def test_a_full_disk_during_training_is_one_line_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    # args.yaml, summary.csv and model_best.safetensors (22 kB) fit under the limit; last.state.pt (42 kB) does not
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "train.py"), *TINY, *SYNTHETIC, "--epochs", "1",
                           "--output", str(tmp_path), "--experiment", "run"], env=env, capture_output=True, text=True,
                          timeout=300, preexec_fn=_limit_file_size(30_000))
    assert proc.returncode == 1
    line = one_line_error(proc.stderr)
    assert line.startswith(f"error: cannot write {tmp_path / 'run' / 'last.state.pt'}: ")
    assert _leftovers(tmp_path / "run") == []
    assert (tmp_path / "run" / "summary.csv").exists() and not (tmp_path / "run" / "last.state.pt").exists()


def test_ctrl_c_finishes_the_write_and_exits_with_one_line(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    run = tmp_path / "run"
    for delay in (0.2, 0.9):  # somewhere among the per-step checkpoint commits
        proc = subprocess.Popen([sys.executable, str(ROOT / "tools" / "train.py"), *TINY, *SYNTHETIC, "--epochs",
                                 "100000", "--checkpoint-interval", "1", "--log-interval", "1", "--output",
                                 str(tmp_path), "--experiment",
                                 "run", *(["--resume", str(run)] if run.exists() else [])],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        while not proc.stdout.readline().startswith("train: "):  # the first step's log line: training is under way
            assert proc.poll() is None, proc.communicate()
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 130, err
        line = one_line_error(err)
        assert line.startswith("interrupted (Ctrl-C);") and f"--resume {run}" in line
        assert _leftovers(run) == []
        assert find_checkpoint(run) is not None


def test_a_nan_batchnorm_buffer_during_training_is_not_blamed_on_the_lr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    real = trainer._Trainer.train_epoch

    def poisoned(self):  # an epoch after which one BN running mean is NaN, the parameters finite
        metrics = real(self)
        self.model.features.denseblock1.denselayer1.norm1.running_mean[0] = float("nan")
        return metrics

    monkeypatch.setattr(trainer._Trainer, "train_epoch", poisoned)
    assert tool.main([*TINY, *SYNTHETIC, "--epochs", "1", "--output", str(tmp_path), "--experiment", "run"]) == 1
    line = one_line_error(capsys.readouterr().err)
    assert "BatchNorm statistics became non-finite" in line and "denselayer1.norm1.running_mean" in line
    assert "--lr" not in line
