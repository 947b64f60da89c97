"""Fault injection: the trainer killed at every write point (inside every file write too) and by real SIGKILLs from
outside; every `--resume` must end with the unbroken run's files, bit for bit."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import load_tool
from safetensors.torch import load_file

from effidense.train import checkpoint
from effidense.train.checkpoint import find_checkpoint

ROOT = Path(__file__).resolve().parents[1]
tool = load_tool("train")

# 2 batches per epoch, 2 epochs, a checkpoint after every step, dropout and EMA: 4 commits, 2 summary rows, model_best.
ARGS = ["--model", "effi_densenet_bc100_k12", "--model-kwargs", "block_config=(2,2)", "growth_rate=4",
        "num_init_features=8", "proj_drop_rate=0.2", "--dataset", "synthetic", "--img-size", "8", "-b", "8",
        "--train-num-samples", "16", "--val-num-samples", "8", "-j", "0", "--warmup-epochs", "0", "--epochs", "2",
        "--lr", "0.05", "--checkpoint-interval", "1", "--model-ema", "--model-ema-decay", "0.9"]
FINAL_FILES = ("last.safetensors", "model_best.safetensors", "summary.csv")


def _argv(out: Path, experiment: str, extra: list[str] | None = None) -> list[str]:
    return [*ARGS, *(extra or []), "--output", str(out), "--experiment", experiment]


def _files(run: Path) -> dict[str, object]:
    files: dict[str, object] = {"summary.csv": (run / "summary.csv").read_text()}
    for name in ("last.safetensors", "model_best.safetensors"):
        files[name] = load_file(run / name)
    found = find_checkpoint(run)
    assert found is not None
    files["ema"] = found.state["ema"]
    files["position"] = found.position
    return files


def _assert_same(got: dict[str, object], expected: dict[str, object], label: str) -> None:
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, dict):
            other = got[key]
            assert isinstance(other, dict) and other.keys() == value.keys(), (label, key)
            assert all(torch.equal(other[k], value[k]) for k in value), (label, key)
        else:
            assert got[key] == value, (label, key)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, object], int]:
    """The unbroken run's final files, and how many write points it passes."""
    out = tmp_path_factory.mktemp("unbroken")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(checkpoint._FAULT_ENV, str(10**9))  # count the points, never kill
        mp.setattr(checkpoint, "_fault_count", 0)
        assert tool.main(_argv(out, "ref")) == 0
        points = checkpoint._fault_count
    return _files(out / "ref"), points


def _fork_killed_at(point: int, argv: list[str]) -> int:
    """Start the trainer in a forked child that SIGKILLs itself at write point ``point``; its pid."""
    pid = os.fork()
    if pid == 0:  # the child: no pytest teardown, no finally blocks after the kill
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            os.environ[checkpoint._FAULT_ENV] = str(point)
            checkpoint._fault_count = 0
            code = tool.main(argv)
        finally:
            os._exit(100 + (locals().get("code") or 0))
    return pid


def test_write_points_cover_every_file(reference) -> None:
    _, points = reference
    # args.yaml 2, 4 checkpoint commits x 6, 2 summary rows x 2, 2 model_best x 2 (the EMA improves both epochs)
    assert points >= 2 + 4 * 6 + 2 * 2 + 2


def test_kill_at_every_write_point_then_resume_equals_unbroken(reference, tmp_path: Path,
                                                                capfd: pytest.CaptureFixture[str]) -> None:
    expected, points = reference
    started_fresh = 0
    # Two write points at a time, each in a directory of its own: their killed children run side by side (one core
    # each), then their final resumes run here in turn.
    for first in range(1, points + 1, 2):
        pair = [point for point in (first, first + 1) if point <= points]
        argvs = {point: _argv(tmp_path / f"kill{point}", "run") for point in pair}
        runs = {point: tmp_path / f"kill{point}" / "run" for point in pair}
        pids = {point: _fork_killed_at(point, argvs[point]) for point in pair}
        for point, pid in pids.items():
            status = os.waitpid(pid, 0)[1]
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (point, status)
            run = runs[point]
            assert not (run / "last.safetensors").exists() or find_checkpoint(run) is not None, point
        capfd.readouterr()
        # A second kill during the resume, at the same point of the resumed run, then the final resume.
        pids = {point: _fork_killed_at(point, [*argvs[point], "--resume", str(runs[point])]) for point in pair}
        for point, pid in pids.items():
            status = os.waitpid(pid, 0)[1]
            assert os.WIFSIGNALED(status) or os.WEXITSTATUS(status) == 100, (point, status)
        for point in pair:
            run = runs[point]
            capfd.readouterr()
            assert tool.main([*argvs[point], "--resume", str(run)]) == 0, point
            started_fresh += "no complete checkpoint yet, starting the run from the beginning" in capfd.readouterr().out
            _assert_same(_files(run), expected, f"killed at write point {point}")
            assert not list(run.glob("*.tmp")) and not list(run.glob(".*.tmp")), point
    assert started_fresh >= 1  # some kills came before the first checkpoint was complete


def test_real_sigkills_from_outside(reference, tmp_path: Path) -> None:
    """SIGKILLs at arbitrary instants from another process: each resume still ends where the unbroken run ends."""
    expected, _ = reference
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS=str(torch.get_num_threads()))
    env.pop(checkpoint._FAULT_ENV, None)
    rng = random.Random(0)
    run = tmp_path / "run"
    argv = _argv(tmp_path, "run")
    kills = 0
    for _ in range(2):
        proc = subprocess.Popen([sys.executable, str(ROOT / "tools" / "train.py"), *argv,
                                 *(["--resume", str(run)] if run.exists() else [])],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while not (run / "args.yaml").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))  # somewhere in the training and checkpoint writes
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(timeout=120)
    assert tool.main([*argv, "--resume", str(run)]) == 0
    _assert_same(_files(run), expected, "after real SIGKILLs")
    assert kills >= 1


def test_resume_without_any_checkpoint_starts_from_the_beginning(reference, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    expected, _ = reference
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.state.pt.tmp").write_bytes(b"PK\x03\x04 cut short")  # a first commit killed mid-write
    assert tool.main([*_argv(tmp_path, "run"), "--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert out.count("no complete checkpoint yet, starting the run from the beginning") == 1
    _assert_same(_files(run), expected, "resumed with no checkpoint")
