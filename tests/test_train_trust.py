"""The trainer never loses work or reports something false: --resume cannot start over a run's results, pretrained
weights must load or be refused, a non-finite evaluation is a failure (never a best model), and every value of a
config file or a resumed run's args.yaml meets the command line's checks."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TRAIN_SYNTHETIC, TRAIN_TINY, load_tool, one_line_error
from safetensors.torch import load_file, save_file

from effidense.train import TrainError, build_model, parse_args, trainer

ROOT = Path(__file__).resolve().parents[1]
tool = load_tool("train")


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def three_epochs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("finished")
    assert tool.main([*TRAIN_TINY, *TRAIN_SYNTHETIC, "--epochs", "3", "--output", str(out), "--experiment", "run"]) == 0
    return out / "run"


# --- resume: never a way around the refusal to write over a run ---

def test_resume_with_its_checkpoint_removed_leaves_a_finished_run_untouched(three_epochs: Path, tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    run.mkdir()
    for name, data in _files(three_epochs).items():
        if not name.startswith("last."):
            (run / name).write_bytes(data)
    before = _files(run)
    capsys.readouterr()
    assert tool.main(["--resume", str(run), "--epochs", "1"]) == 1
    line = one_line_error(capsys.readouterr().err)
    assert f"{run} has no checkpoint to continue from" in line and "summary.csv (epochs 0, 1, 2)" in line
    assert "--force" in line
    assert _files(run) == before  # model_best and the three summary rows are what they were


def test_resume_into_a_directory_of_other_files_touches_nothing(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / ".notes.tmp").write_text("someone's temporary file")
    (other / "summary.csv").write_text("name,value\na,1\nb,2\n")
    before = sorted(p.name for p in other.iterdir()), _files(other)
    assert tool.main([*TRAIN_TINY, *TRAIN_SYNTHETIC, "--resume", str(other), "--epochs", "1"]) == 1
    line = one_line_error(capsys.readouterr().err)
    assert "summary.csv (not a summary of this trainer)" in line and ".notes.tmp" in line
    assert (sorted(p.name for p in other.iterdir()), _files(other)) == before  # not even a lock file was made


def test_resume_with_force_starts_such_a_run_again(tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "summary.csv").write_text("name,value\na,1\n")
    assert tool.main([*TRAIN_TINY, *TRAIN_SYNTHETIC, "--resume", str(other), "--epochs", "1", "--force"]) == 0
    assert (other / "last.safetensors").exists() and (other / "summary.csv").read_text().startswith("epoch,")


def test_a_run_killed_before_its_directory_existed_resumes_with_the_same_command(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "out" / "run"
    argv = [*TRAIN_TINY, *TRAIN_SYNTHETIC, "--epochs", "1", "--output", str(tmp_path / "out"), "--experiment", "run",
            "--resume", str(run)]
    assert tool.main(argv) == 0
    assert "no complete checkpoint yet, starting the run from the beginning" in capsys.readouterr().out
    assert (run / "last.safetensors").exists()
    assert tool.main(argv) == 0  # and the same command continues it: its one epoch is done
    assert "nothing to do" in capsys.readouterr().out


def test_a_killed_run_is_resumable_at_once_though_its_loader_workers_linger(tmp_path: Path) -> None:
    """A SIGKILL leaves the data-loader workers alive for a few seconds; the run directory's lock must die with the
    training process, not with them."""
    run = tmp_path / "run"
    argv = [*TRAIN_TINY, "--dataset", "synthetic", "--img-size", "8", "-b", "2", "--train-num-samples", "4000",
            "--val-num-samples", "4", "-j", "1", "--warmup-epochs", "0", "--epochs", "1", "--checkpoint-interval",
            "1", "--output", str(tmp_path), "--experiment", "run"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH",
                                                                                                      "")]))
    proc = subprocess.Popen([sys.executable, str(ROOT / "tools" / "train.py"), *argv], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
        while time.monotonic() < deadline and not ((run / "last.state.pt").exists() and children.read_text().strip()):
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.02)
        workers = children.read_text().split()
        assert workers, "no data-loader worker was started"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert any(Path(f"/proc/{pid}").exists() for pid in workers)  # what used to keep the directory locked
        assert tool.main(["--resume", str(run), "--train-num-samples", "8"]) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- pretrained weights: loaded and said so, or refused ---

def _weights(tmp_path: Path, num_classes: int = 10) -> tuple[Path, dict[str, torch.Tensor]]:
    model = build_model(parse_args(TRAIN_TINY), num_classes)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    path = tmp_path / "weights.safetensors"
    save_file(weights, str(path))
    return path, weights


@pytest.mark.parametrize("damage", ["renamed", "one-tensor"])
def test_pretrained_weights_that_do_not_fit_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        damage: str) -> None:
    _, weights = _weights(tmp_path)
    if damage == "renamed":
        weights = {key.replace("features.", "backbone."): value for key, value in weights.items()}
    else:
        weights = {"w": torch.ones(3)}
    path = tmp_path / "bad.safetensors"
    save_file(weights, str(path))
    argv = [*TRAIN_TINY, *TRAIN_SYNTHETIC, "--epochs", "1", "--lr", "0", "--pretrained-path", str(path),
            "--output", str(tmp_path / "out")]
    assert tool.main(argv) == 1
    line = one_line_error(capsys.readouterr().err)
    assert line.startswith(f"error: --pretrained-path {path}: the weights do not fit effi_densenet_bc100_k12")
    assert "missing: features.conv0.weight" in line
    assert ("unknown: backbone.conv0.weight" if damage == "renamed" else "1 unknown: w") in line
    assert not (tmp_path / "out").exists()


def test_pretrained_weights_load_and_the_run_says_what_it_loaded(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    path, weights = _weights(tmp_path)
    notes: list[str] = []
    model = build_model(parse_args([*TRAIN_TINY, "--pretrained-path", str(path)]), 3, notes)
    loaded = model.state_dict()
    for key, value in weights.items():
        if not key.startswith("classifier."):
            assert torch.equal(loaded[key], value), key
    assert loaded["classifier.weight"].shape == (3, weights["classifier.weight"].shape[1])
    tensors = len(weights) - 2
    assert notes == [f"--pretrained-path {path}: loaded {tensors} tensors into effi_densenet_bc100_k12; "
                     "classifier.weight, classifier.bias initialised afresh (the classifier, as timm replaces it)"]
    argv = [*TRAIN_TINY, *TRAIN_SYNTHETIC, "--epochs", "1", "--pretrained-path", str(path), "--output",
            str(tmp_path / "out")]
    assert tool.main(argv) == 0
    assert notes[0] in capsys.readouterr().out


def test_pretrained_weights_with_other_input_channels_are_adapted_and_said_so(tmp_path: Path) -> None:
    path, _ = _weights(tmp_path)
    notes: list[str] = []
    kwargs = ["block_config=(2,2)", "growth_rate=4", "num_init_features=8", "in_chans=1"]
    build_model(parse_args([*TRAIN_TINY[:2], "--model-kwargs", *kwargs, "--pretrained-path", str(path)]), 3, notes)
    assert "adapted features.conv0.weight from 3 to 1 input channels" in notes[0]


# --- weights whose model would output NaN, and an evaluation that does ---

@pytest.mark.parametrize("flag", ["--initial-checkpoint", "--pretrained-path"])
def test_a_negative_running_variance_is_refused_on_load(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        flag: str) -> None:
    _, weights = _weights(tmp_path)
    weights["features.norm5.running_var"] = -weights["features.norm5.running_var"] - 1
    path = tmp_path / "negative.safetensors"
    save_file(weights, str(path))
    argv = [*TRAIN_TINY, *TRAIN_SYNTHETIC, "--epochs", "2", flag, str(path), "--output", str(tmp_path / "out")]
    assert tool.main(argv) == 1
    line = one_line_error(capsys.readouterr().err)
    assert line.startswith(f"error: {flag} {path}: ") and "negative variances" in line
    assert "features.norm5.running_var" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("ema", [False, True])
def test_a_non_finite_evaluation_stops_the_run_and_is_never_best(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str],
                                                                 ema: bool) -> None:
    real = trainer._Trainer.evaluate

    def evaluate_broken(self, model):  # statistics no training step makes: outputs NaN in eval mode only
        if self.epoch == 1 and (model is not self.model) == ema:
            model.features.norm5.running_var.fill_(-1.0)
        return real(self, model)

    monkeypatch.setattr(trainer._Trainer, "evaluate", evaluate_broken)
    argv = [*TRAIN_TINY, *TRAIN_SYNTHETIC, "--epochs", "3", "--eval-metric", "top1", "--output", str(tmp_path),
            "--experiment", "run", *(["--model-ema"] if ema else [])]
    assert tool.main(argv) == 1
    captured = capsys.readouterr()
    line = one_line_error(captured.err)
    which = "the EMA weights" if ema else "the model"
    assert line.startswith(f"error: the evaluation of {which} failed at epoch 1: eval loss nan")
    assert "epoch 1:" not in captured.out  # no score was reported for it
    run = tmp_path / "run"
    assert (run / "summary.csv").read_text().count("\n") == 2  # the header and epoch 0
    best = load_file(run / "model_best.safetensors")
    assert all(torch.isfinite(v).all() for v in best.values() if v.is_floating_point())
    assert (best["features.norm5.running_var"] >= 0).all()


# --- every value, from any source, meets the flag's checks ---

@pytest.mark.parametrize("text, message", [
    ("grad-accum-steps: 0", "--grad-accum-steps 0: must be from 1 to"),
    ("memory: fast", "--memory 'fast': choose from plain, efficient, frugal"),
    ("eval-metric: foo", "--eval-metric 'foo': choose from top1, top5, loss"),
    ("val-num-samples: 0", "--val-num-samples 0: must be from 1 to"),
    ("epochs: null", "--epochs None: a value is needed"),
    ("amp: 1", "--amp 1: expected true or false"),
    ("scale: [0.5]", "--scale [0.5]: expected 2 values"),
    ("lr: true", "--lr True: expected a number"),
    ("model_kwargs: [1, 2]", "--model-kwargs [1, 2]: expected a mapping"),
    ("seed: 99999999999999999999", "--seed 99999999999999999999: must be from 0 to 4294967295"),
    ("decay-milestones: 30", "--decay-milestones 30: expected a list of values"),
])
def test_a_config_file_meets_the_flags_checks(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "cfg.yaml"
    config.write_text(text + "\n")
    with pytest.raises(TrainError) as exc:
        parse_args(["--config", str(config)])
    assert str(exc.value).startswith(f"--config {config}: ") and message in str(exc.value)


def test_a_resumed_run_s_args_yaml_meets_the_flags_checks(three_epochs: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    run.mkdir()
    for name, data in _files(three_epochs).items():
        (run / name).write_bytes(data)
    text = (run / "args.yaml").read_text()
    (run / "args.yaml").write_text(text.replace("grad_accum_steps: 1", "grad_accum_steps: 0"))
    before = _files(run)
    assert tool.main(["--resume", str(run), "--epochs", "4"]) == 1
    line = one_line_error(capsys.readouterr().err)
    assert line.startswith(f"error: --resume {run}: {run / 'args.yaml'}: --grad-accum-steps 0: must be from 1")
    assert _files(run) == before


@pytest.mark.parametrize("flags, message", [
    (["--seed", "-1"], "argument --seed: must be from 0 to 4294967295, got -1"),
    (["--train-num-samples", "99999999999999999999"], "argument --train-num-samples: must be from 1 to 2147483647"),
    (["-vb", "99999999999999999999"], "argument -vb/--validation-batch-size: must be from 1 to 2147483647"),
    (["--workers", "100000"], "argument -j/--workers: must be from 0 to 256"),
    (["--hflip", "5"], "argument --hflip: must be a number in [0, 1], got 5"),
    (["--decay-milestones", "-5"], "argument --decay-milestones: must be from 0 to"),
])
def test_numbers_out_of_range_are_refused_up_front(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   flags: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as exc:
        tool.main([*TRAIN_TINY, *TRAIN_SYNTHETIC, *flags, "--output", str(tmp_path / "out")])
    assert exc.value.code == 2
    assert message in one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_a_scale_range_upside_down_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert tool.main([*TRAIN_TINY, *TRAIN_SYNTHETIC, "--scale", "0.9", "0.1"]) == 1
    assert "--scale 0.9 0.1: expected MIN MAX" in one_line_error(capsys.readouterr().err)


def test_a_model_argument_set_to_none_is_refused_as_timm_would_drop_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert tool.main([*TRAIN_TINY, *TRAIN_SYNTHETIC, "--model-kwargs", "backward_slices=None"]) == 1
    assert ("--model-kwargs backward_slices=None: timm.create_model drops arguments set to None, so the model's "
            "default would apply; leave them out for the default; backward_slices=1 slices no backward"
            ) in one_line_error(capsys.readouterr().err)


def test_a_run_whose_args_yaml_holds_a_retired_flag_still_resumes(three_epochs: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    for name, data in _files(three_epochs).items():
        (run / name).write_bytes(data)
    (run / "args.yaml").write_text((run / "args.yaml").read_text() + "compile_scope: layers\n")
    assert tool.main(["--resume", str(run), "--epochs", "4"]) == 0
    assert (run / "summary.csv").read_text().count("\n") == 5
