"""The trainer's guards: no non-finite checkpoint, one run per directory, one-line errors, log lines off a terminal,
`--model-kwargs` syntax, and the `effidense timm` command."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TRAIN_SYNTHETIC, TRAIN_TINY, load_tool, one_line_error
from PIL import Image
from safetensors.torch import load_file

from effidense.cli import main as effidense_main
from effidense.train.checkpoint import find_checkpoint

ROOT = Path(__file__).resolve().parents[1]
tool = load_tool("train")

TINY, SYNTHETIC = TRAIN_TINY, TRAIN_SYNTHETIC


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    env.pop("EFFIDENSE_TIMM_SCRIPT", None)
    return env


def _all_finite(tensors: dict[str, torch.Tensor]) -> bool:
    return all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())


# --- non-finite weights are never saved ---

def test_non_finite_weights_are_never_saved_with_no_good_checkpoint(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    # One batch per epoch; the first step (lr 3e38, weight decay 100) makes the weights infinite while its loss was
    # finite: without the guard the epoch-end model_best and last.* held them.
    argv = [*TINY, *SYNTHETIC, "--train-num-samples", "8", "--epochs", "3", "--lr", "3e38", "--weight-decay", "100",
            "--smoothing", "0", "--checkpoint-interval", "1", "--output", str(tmp_path), "--experiment", "run"]
    assert tool.main(argv) == 1
    line = one_line_error(capsys.readouterr().err)
    assert "non-finite" in line and "Last good checkpoint: none" in line
    run = tmp_path / "run"
    assert not any((run / name).exists() for name in ("last.safetensors", "last.state.pt", "model_best.safetensors"))


def test_non_finite_weights_name_the_last_finite_checkpoint(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    # Epoch 1 at the warm-up lr is saved; the first step of epoch 2 blows the weights (and the EMA) up.
    argv = [*TINY, *SYNTHETIC, "--epochs", "3", "--warmup-epochs", "1", "--warmup-lr", "1e-3", "--lr", "3e38",
            "--weight-decay", "100", "--checkpoint-interval", "1", "--model-ema", "--output", str(tmp_path),
            "--experiment", "run"]
    assert tool.main(argv) == 1
    line = one_line_error(capsys.readouterr().err)
    run = tmp_path / "run"
    assert f"Last good checkpoint: {run / 'last.safetensors'}" in line
    found = find_checkpoint(run)
    assert found is not None and (found.state["epoch"], found.state["step"]) == (1, 2)
    assert _all_finite(found.weights) and _all_finite(found.state["ema"])
    assert _all_finite(load_file(run / "model_best.safetensors"))


# --- one run per directory ---

def test_second_run_into_the_same_directory_is_refused(tmp_path: Path) -> None:
    """Two real processes started together into one run directory: one trains, the other is refused at once."""
    argv = [sys.executable, str(ROOT / "tools" / "train.py"), *TINY, *SYNTHETIC, "--epochs", "100000",
            "--output", str(tmp_path), "--experiment", "run"]
    procs = [subprocess.Popen(argv, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    try:
        deadline = time.monotonic() + 240
        while all(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.05)
        refused = [p for p in procs if p.poll() is not None]
        assert len(refused) == 1, "neither run was refused"
        running = next(p for p in procs if p is not refused[0])
        out, err = refused[0].communicate()
        assert refused[0].returncode == 1
        line = one_line_error(err)
        assert line.startswith("error: another run is writing") and str(tmp_path / "run") in line
        assert "training" not in out
        args_yaml = (tmp_path / "run" / "args.yaml").read_text()
        time.sleep(0.5)
        assert running.poll() is None  # the first run goes on, its files untouched by the refused one
        assert (tmp_path / "run" / "args.yaml").read_text() == args_yaml
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
            p.communicate()


# --- one-line errors, before any output ---

@pytest.fixture
def finished_run(tmp_path: Path) -> tuple[list[str], Path]:
    argv = [*TINY, *SYNTHETIC, "--epochs", "1", "--output", str(tmp_path), "--experiment", "run"]
    assert tool.main(argv) == 0
    return argv, tmp_path / "run"


@pytest.mark.parametrize("damage", ["truncate", "empty"])
def test_resume_from_a_damaged_checkpoint_is_one_line(finished_run, damage: str,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    argv, run = finished_run
    weights = run / "last.safetensors"
    os.truncate(weights, weights.stat().st_size // 2 if damage == "truncate" else 0)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    capsys.readouterr()
    assert tool.main([*argv, "--epochs", "2", "--resume", str(run)]) == 1
    line = one_line_error(capsys.readouterr().err)
    assert line.startswith("error: ") and str(weights) in line
    assert ("truncated" in line) if damage == "truncate" else ("empty" in line)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


@pytest.mark.parametrize("flags, message", [
    (["--lr", "-1"], "argument --lr: must be a finite number >= 0, got -1"),
    (["--lr", "nan"], "argument --lr: must be a finite number >= 0"),
    (["--smoothing", "1.5"], "argument --smoothing: must be in [0, 1) (label smoothing), got 1.5"),
    (["--model-kwargs", '{"growth_rate": 4}'], "argument --model-kwargs: '{\"growth_rate\": 4}' is not KEY=VALUE"),
    (["--model-kwargs", "growth_rate"], "argument --model-kwargs: 'growth_rate' is not KEY=VALUE"),
])
def test_bad_flags_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], flags, message) -> None:
    with pytest.raises(SystemExit) as exc:
        tool.main([*TINY, *SYNTHETIC, *flags, "--output", str(tmp_path / "out")])
    assert exc.value.code == 2
    line = one_line_error(capsys.readouterr().err)
    assert message in line
    assert not (tmp_path / "out").exists()


def test_model_kwargs_keep_timm_syntax() -> None:
    from effidense.train import parse_args

    args = parse_args(["--model-kwargs", "block_config=(2,2)", "growth_rate=4", "name=a=b", "memory=plain"])
    assert args.model_kwargs == {"block_config": (2, 2), "growth_rate": 4, "name": "a=b", "memory": "plain"}


def _images(root: Path, layout: dict[str, int], corrupt: bool = False) -> Path:
    for folder, count in layout.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            if corrupt:
                (root / folder / f"{i}.png").write_bytes(b"not a png")
            else:
                Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(root / folder / f"{i}.png")
    return root


@pytest.mark.parametrize("case, message", [
    ("img-size", "--img-size 1: effi_densenet_bc100_k12 cannot take one 3x1x1 image (input of 1x1 is too small"),
    ("corrupt", "cannot read the training images"),
    ("one-class", "the training data has a single class (a); a classifier needs at least two"),
])
def test_bad_data_or_size_is_one_line_before_any_output(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        case: str, message: str) -> None:
    data = tmp_path / "data"
    if case == "corrupt":
        _images(data, {"train/a": 12, "train/b": 12}, corrupt=True)
        _images(data, {"val/a": 2, "val/b": 2})
    elif case == "one-class":
        _images(data, {"train/a": 8, "val/a": 2})
    else:
        _images(data, {"train/a": 8, "train/b": 8, "val/a": 2, "val/b": 2})
    size = "1" if case == "img-size" else "8"
    argv = [*TINY, "--data-dir", str(data), "--img-size", size, "-b", "4", "-j", "0", "--epochs", "1",
            "--output", str(tmp_path / "out"), "--experiment", "run"]
    assert tool.main(argv) == 1
    line = one_line_error(capsys.readouterr().err)
    assert line.startswith("error: ") and message in line
    assert not (tmp_path / "out").exists()


# --- logs ---

def test_log_lines_when_not_a_terminal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [*TINY, *SYNTHETIC, "--train-num-samples", "64", "--epochs", "2", "--log-interval", "3",
            "--output", str(tmp_path), "--experiment", "run"]
    assert tool.main(argv) == 0
    captured = capsys.readouterr()
    assert "\r" not in captured.out + captured.err  # no progress bar in a log file
    lines = captured.out.splitlines()
    steps = [line for line in lines if line.startswith("train: ")]
    # 8 batches per epoch, a line every 3 steps and at the epoch's end: 3, 6, 8
    assert [line.split("[")[1].split("]")[0].split(" (")[0].strip() for line in steps] == ["3/8", "6/8", "8/8"] * 2
    assert all(" loss " in line and " lr " in line and "img/s" in line for line in steps)
    # epochs are counted from 0 everywhere, as timm counts them: the log lines, summary.csv, the final line
    assert steps[0].startswith("train: epoch 0 [") and steps[-1].startswith("train: epoch 1 [")
    assert [line.split(":")[0] for line in lines if line.startswith("epoch ") and "train_loss" in line] == [
        "epoch 0", "epoch 1"]
    with open(tmp_path / "run" / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["epoch"] for row in rows] == ["0", "1"]
    best = max(rows, key=lambda row: float(row["eval_top1"]))  # the first of equals, as the trainer keeps
    assert f"done: best {float(best['eval_top1']):.4f} at epoch {best['epoch']} " in captured.out



def test_a_terminal_gets_the_one_progress_bar(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import effidense.progress

    monkeypatch.setattr(effidense.progress, "is_terminal", lambda stream=None: True)
    argv = [*TINY, *SYNTHETIC, "--train-num-samples", "64", "--epochs", "1", "--log-interval", "3",
            "--output", str(tmp_path), "--experiment", "run"]
    assert tool.main(argv) == 0
    captured = capsys.readouterr()
    assert not [line for line in captured.out.splitlines() if line.startswith("train: ")]  # the bar instead
    assert "epoch 0" in captured.err and "8/8" in captured.err and "loss=" in captured.err


def test_progress_lines_at_the_callers_cadence() -> None:
    import io

    from effidense.progress import Progress

    stream, lines = io.StringIO(), io.StringIO()
    progress = Progress(8, "epoch 0", "it", stream=stream, interval_s=None, initial=2)
    for step in range(3, 9):
        progress.advance()
        if step % 3 == 0:
            progress.log(f"step {step}", note="loss=1", file=lines)
    progress.close()
    assert progress.n == 8 and stream.getvalue() == "" and lines.getvalue() == "step 3\nstep 6\n"
    silent = Progress(8, "epoch 0", "it", enabled=False, stream=stream, interval_s=None)
    silent.log("never", file=lines)
    silent.close()
    assert lines.getvalue() == "step 3\nstep 6\n"

# --- effidense timm ---

STAND_IN = '''
import json, sys
import timm
model = timm.create_model(sys.argv[sys.argv.index("--model") + 1], num_classes=3)
with open(sys.argv[sys.argv.index("--record") + 1], "w") as f:
    json.dump(dict(argv=sys.argv, name=__name__, model=type(model).__module__), f)
sys.exit(int(sys.argv[sys.argv.index("--exit-code") + 1]) if "--exit-code" in sys.argv else 0)
'''


@pytest.mark.parametrize("name", ["validate.py", "benchmark.py"])
def test_effidense_timm_runs_a_script_with_effi_models(tmp_path: Path, name: str) -> None:
    script = tmp_path / name
    script.write_text(STAND_IN)
    record = tmp_path / "record.json"
    assert effidense_main(["timm", str(script), "--model", "effi_densenet40_k12", "--record", str(record),
                           "--exit-code", "4"]) == 4
    got = json.loads(record.read_text())
    assert got == dict(argv=[str(script), "--model", "effi_densenet40_k12", "--record", str(record), "--exit-code",
                             "4"], name="__main__", model="effidense.densenet")


def test_effidense_timm_refuses_a_model_argument_that_timm_would_drop(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    script, record = tmp_path / "train.py", tmp_path / "record.json"
    script.write_text(STAND_IN)
    assert effidense_main(["timm", str(script), "--model", "effi_densenet40_k12", "--model-kwargs", "growth_rate=4",
                           "backward_slices=None", "--record", str(record)]) == 1
    assert ("--model-kwargs backward_slices=None: timm.create_model drops arguments set to None"
            in one_line_error(capsys.readouterr().err))
    assert not record.exists()  # the script never ran


# `python -m effidense timm train.py ...` in a fresh interpreter (only the command can have imported effidense before
# the script's create_model): test_train.py's test_wrapper_runs_script_as_main_with_effidense_registered, which runs
# that very command and checks the model's class, the script's argv, __name__ and exit code.


def test_effidense_timm_usage_and_missing_script(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert effidense_main(["timm"]) == 2
    assert "usage: effidense timm" in capsys.readouterr().out
    assert effidense_main(["timm", str(tmp_path / "validate.py")]) == 1
    line = one_line_error(capsys.readouterr().err)
    assert "validate.py: no such file" in line
