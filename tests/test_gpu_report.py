"""tools/gpu_report.py: the smoke run end to end, partial results, time budgets, failures, bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import load_tool

from effidense import gpu_report
from effidense.gpu_report import SECTION_RUNNERS, smoke_plan

tool = load_tool("gpu_report")


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One full smoke run (every section), shared by the tests below; a generous budget keeps it deterministic."""
    out = tmp_path_factory.mktemp("smoke") / "report"
    import contextlib
    import io

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert tool.main(["--out", str(out), "--smoke", "--time-budget", "3000", "--quiet"]) == 0
    return out, stdout.getvalue()


@pytest.mark.slow
def test_smoke_runs_every_section_and_prints_the_summary_last(smoke):
    out, printed = smoke
    report = _report(out)
    assert report["complete"] and report["smoke"]
    assert list(report["sections"]) == list(gpu_report.SECTIONS)  # most important first
    statuses = {name: s["status"] for name, s in report["sections"].items()}
    assert statuses == {**dict.fromkeys(gpu_report.SECTIONS, "ok"), "max-batch": "skipped"}  # it needs a GPU
    assert printed.strip() == (out / "summary.md").read_text().strip()
    bench = report["sections"]["step-time"]["data"]["commands"][0]
    assert bench["command"].split()[1:4] == ["-m", "effidense", "bench"] and bench["passed"]
    results = {r["variant"]: r for r in bench["result"]["results"]}  # bench's own JSON, kept in the report
    assert list(results) == list(gpu_report.EAGER)
    assert all(r["status"] == "ok" and r["step_ms"] > 0 for r in results.values()), results
    assert results["efficient"]["activation_bytes"] < results["tv-plain"]["activation_bytes"]
    assert (out / bench["json"]).is_file() and (out / bench["log"]).is_file()
    assert "| efficient " in (out / "summary.md").read_text()  # bench's table, as bench prints it
    checks = {c["check"]: c for c in report["sections"]["correctness"]["data"]["commands"]}
    assert checks["gradcheck"]["passed"] and "all" in checks["gradcheck"]["last_line"]
    assert checks["gradcheck"]["result"]["checks"]
    assert checks["pytest -m cuda"]["rc"] == 0  # selected and skipped without a GPU (rc 5 if none were selected)
    assert "skipped" in checks["pytest -m cuda"]["last_line"] or torch.cuda.is_available()


@pytest.mark.slow
def test_smoke_compares_the_planners_prediction_with_a_measured_step(smoke):
    """The prediction section is `effidense plan --check`: a real step of each eager variant beside the plan."""
    out, _ = smoke
    command = _report(out)["sections"]["prediction"]["data"]["commands"][0]
    assert command["command"].split()[3:5] == ["plan", "--model"] and "--check" in command["command"]
    assert command["passed"], command["last_line"]
    variants = {v["name"]: v for v in command["result"]["variants"]}  # plan's own JSON, kept in the report
    assert set(variants) == {"tv-plain", "tv", "timm", "plain", "efficient", "frugal"}
    for v in variants.values():
        assert v["status"] == "ok" and v["measured_peak_bytes"] > 0 and v["peak_bytes"] > 0, v
    assert "| predicted peak | measured peak |" in (out / "summary.md").read_text()  # plan's table, as it prints it


@pytest.mark.slow
def test_smoke_measures_volumes_against_monai(smoke):
    out, _ = smoke
    command = _report(out)["sections"]["3d"]["data"]["commands"][0]
    assert "spatial_dims=3" in command["command"] and command["passed"]
    results = {r["variant"]: r for r in command["result"]["results"]}
    assert list(results) == ["monai", "plain", "efficient", "frugal"]
    assert all(r["status"] == "ok" for r in results.values()), results
    assert results["efficient"]["activation_bytes"] < results["monai"]["activation_bytes"]


def test_time_budget_spent_is_recorded_per_section(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "r"
    assert tool.main(["--out", str(out), "--smoke", "--time-budget", "1e-6", "--quiet"]) == 1
    report = _report(out)
    assert report["complete"]
    statuses = {s["status"] for name, s in report["sections"].items() if name != "max-batch"}
    assert statuses == {"out of time"}
    assert "status: out of time" in capsys.readouterr().out


def test_failing_section_is_recorded_and_the_run_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def boom(run, section):
        section["data"]["half"] = 1
        raise RuntimeError("boom\nsecond line")

    def fine(run, section):
        section["data"]["commands"] = [{"check": "c", "passed": True, "last_line": "all good"}]

    monkeypatch.setitem(SECTION_RUNNERS, "step-time", boom)
    monkeypatch.setitem(SECTION_RUNNERS, "3d", fine)
    report = gpu_report.run_report(smoke_plan(), tmp_path, ["3d", "step-time"])
    assert list(report["sections"]) == ["step-time", "3d"]  # importance order, whatever the order asked
    first, volumes = report["sections"]["step-time"], report["sections"]["3d"]
    assert (first["status"], first["error"], first["data"]) == ("failed", "RuntimeError: boom second line",
                                                                {"half": 1})
    assert volumes["status"] == "ok"
    assert "status: failed" in (tmp_path / "summary.md").read_text()


def test_a_failing_command_fails_its_section_with_its_last_line(tmp_path: Path):
    plan = smoke_plan()
    # a usage error (status 2) answers before the command loads torch: the section's run is the same, seconds sooner
    broken = {**plan.commands, "step-time": (("bench", ("bench", "--steps", "0")),)}
    import dataclasses

    report = gpu_report.run_report(dataclasses.replace(plan, commands=broken), tmp_path, ["step-time"])
    section = report["sections"]["step-time"]
    assert section["status"] == "failed" and "exited with status 2" in section["error"]
    assert "argument --steps: must be at least 1, got 0" in section["data"]["commands"][0]["last_line"]


def test_a_run_cut_short_leaves_the_finished_sections(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def measured(run, section):
        section["data"]["commands"] = [{"check": "bench", "passed": True, "last_line": "7"}]

    def killed(run, section):
        section["data"]["commands"] = [{"check": "bench 3d", "passed": True, "last_line": "9"}]
        run.save()  # what sections do after each command
        raise KeyboardInterrupt

    monkeypatch.setitem(SECTION_RUNNERS, "step-time", measured)
    monkeypatch.setitem(SECTION_RUNNERS, "3d", killed)
    with pytest.raises(KeyboardInterrupt):
        gpu_report.run_report(smoke_plan(), tmp_path, ["step-time", "3d", "correctness"])
    report = _report(tmp_path)
    assert not report["complete"]
    sections = report["sections"]
    assert sections["step-time"]["status"] == "ok" and sections["step-time"]["data"]["commands"][0]["last_line"] == "7"
    assert sections["3d"]["status"] == "running" and sections["3d"]["data"]["commands"][0]["last_line"] == "9"
    assert sections["correctness"]["status"] == "pending"
    assert "INCOMPLETE" in (tmp_path / "summary.md").read_text()
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("argv, message", [
    (["--smoke", "--sections", "step-time,bogus"], "unknown section(s) bogus"),
    (["--smoke", "--time-budget", "0"], "must be positive"),
    (["--smoke", "--time-budget", "inf"], "argument --time-budget: must be positive and finite, got 'inf'"),
    (["--smoke", "--time-budget", "1e400"], "argument --time-budget: must be positive and finite, got '1e400'"),
    (["--smoke", "--time-budget", "nan"], "argument --time-budget: must be positive and finite, got 'nan'"),
    (["--smoke", "--out", "/nonexistent-dir/x"], "parent directory /nonexistent-dir does not exist"),
])
def test_bad_arguments_get_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv, message):
    if "--out" not in argv:
        argv = [*argv, "--out", str(tmp_path / "r")]
    with pytest.raises(SystemExit) as exit_info:
        tool.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r").exists()


def test_existing_report_needs_force_and_gpu_run_needs_a_gpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    (tmp_path / "report.json").write_text("{}")
    with pytest.raises(SystemExit):
        tool.main(["--out", str(tmp_path), "--smoke"])
    assert "report.json exists (pass --force to overwrite)" in capsys.readouterr().err
    assert (tmp_path / "report.json").read_text() == "{}"
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            tool.main(["--out", str(tmp_path / "gpu")])
        assert "no CUDA device" in capsys.readouterr().err
        assert not (tmp_path / "gpu").exists()


def test_dispatcher_reaches_the_command(capsys: pytest.CaptureFixture[str]):
    from effidense.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["gpu-report", "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("usage: effidense gpu-report")


def test_the_gpu_plan_composes_bench_and_gradcheck_on_the_gpu():
    plan = gpu_report.gpu_plan()
    step = dict(plan.commands["step-time"])["bench"]
    assert "efficient+compile" in step[step.index("--variants") + 1] and "--max-batch" in dict(
        plan.commands["max-batch"])["bench --max-batch"]
    assert plan.spec.name == "densenet121" and plan.model_flags("3d")[-3:] == ["spatial_dims=3", "in_chans=1",
                                                                              "num_classes=2"]


def test_peer_names_mean_what_they_mean_in_bench():
    from effidense.gpu_report import VARIANTS
    from effidense.harness import PEERS

    assert all(VARIANTS[peer] == description for peer, description in PEERS.items())
