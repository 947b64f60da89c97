"""tools/gpu_report.py: the smoke run end to end, partial results, time budgets, failures, searches, bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import load_tool

from effidense import SavedTensorMeter, gpu_report
from effidense.gpu_report import OutOfTime, build_model, busy_time, depth_spec, search, smoke_plan
from effidense.gpu_report.sections import SECTION_RUNNERS
from effidense.gpu_report.state import Run
from effidense.harness import step_loss

tool = load_tool("gpu_report")


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def _meter_bytes(model: torch.nn.Module, batch: int, img: int, amp: str | None) -> int:
    """What a search probe counts: the saved bytes of a training forward and its loss."""
    x, y = torch.randn(batch, 3, img, img), torch.zeros(batch, dtype=torch.long)
    with SavedTensorMeter(exclude=model) as meter:
        step_loss(model.train(), x, y, amp)
    return meter.bytes


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
    assert {s["status"] for s in report["sections"].values()} == {"ok"}
    assert printed.strip() == (out / "summary.md").read_text().strip()
    cells = report["sections"]["step-time"]["data"]["cells"]
    assert len(cells) == len(smoke_plan().cells) == 9
    first = cells[0]["rows"]
    assert set(first) == set(gpu_report.VARIANTS) - {"monai"}  # MONAI runs in the 3d section only
    assert all(r["status"] == "ok" and r["rounds"] == 2 and r["step_ms"] > 0 for r in first.values()), first
    assert first["tv-plain"]["step_vs_tv_plain"] == 1.0 and first["efficient"]["memory_x_less_vs_tv_plain"] > 1.5
    goals = [g["goal"] for s in report["sections"].values() for g in s.get("goals", [])]
    assert any("best compiled efficient path" in g for g in goals) and any("frugal trains" in g for g in goals)
    seed = report["sections"]["seed"]["data"]
    assert seed["rows"]["efficient"]["ratio_b_f"] > 0 and seed["seed_table"]["plain"]["backward_ms"] == 77.9
    seed_batch = {e["variant"]: e["value"] for e in seed["searches"]}
    assert seed_batch["efficient"] > seed_batch["plain"] > 0
    host = report["sections"]["host-bound"]["data"]["rows"]
    assert [r["variant"] for r in host][0] == "efficient" and all(0 <= r["idle_fraction"] < 1 for r in host)
    checks = {c["check"]: c for c in report["sections"]["correctness"]["data"]["checks"]}
    assert checks["gradcheck"]["passed"] and "all" in checks["gradcheck"]["last_line"]
    assert checks["pytest -m cuda"]["rc"] == 0  # selected and skipped without a GPU (rc 5 if none were selected)
    assert "skipped" in checks["pytest -m cuda"]["last_line"] or torch.cuda.is_available()
    assert (out / checks["gradcheck"]["log"]).is_file()


@pytest.mark.slow
def test_smoke_searches_really_bisect_the_meter_budget(smoke):
    """The max-batch and depth answers are the exact edge of the meter budget: the answer fits, one more does not."""
    out, _ = smoke
    report, plan = _report(out), smoke_plan()
    caps = {c.label: c.bytes for c in plan.caps}
    searches = report["sections"]["max-batch"]["data"]["searches"]
    assert len(searches) == 8 and all(e["status"] == "ok" and e["probes"] > 2 for e in searches)
    for e in searches[:4]:
        model = build_model(e["variant"], plan.dn121, {})
        cap = caps[e["cap"]]
        assert _meter_bytes(model, e["value"], plan.img_size, "bf16") <= cap < \
            _meter_bytes(model, e["value"] + 1, plan.img_size, "bf16"), e
    depth = {e["variant"]: e for e in report["sections"]["depth"]["data"]["searches"]}
    assert depth["frugal"]["value"] > depth["efficient"]["value"] > depth["plain"]["value"] >= 1
    n = depth["efficient"]["value"]
    fit, over = (_meter_bytes(depth_spec(plan, k).build("efficient"), plan.depth_batch, plan.depth_img, None)
                 for k in (n, n + 1))
    assert fit <= plan.cap.bytes < over
    assert depth["efficient"]["depth"] == 6 * n + 4


def test_time_budget_spent_is_recorded_per_section(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "r"
    assert tool.main(["--out", str(out), "--smoke", "--time-budget", "1e-6", "--quiet"]) == 1
    report = _report(out)
    assert report["complete"]
    assert {s["status"] for s in report["sections"].values()} == {"out of time"}
    assert "status: out of time" in capsys.readouterr().out


def test_failing_section_is_recorded_and_the_run_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def boom(run, section):
        section["data"]["half"] = 1
        raise RuntimeError("boom\nsecond line")

    def fine(run, section):
        section["data"]["searches"] = [{"cap": "c", "variant": "plain", "value": 3, "status": "ok"}]

    monkeypatch.setitem(SECTION_RUNNERS, "seed", boom)
    monkeypatch.setitem(SECTION_RUNNERS, "depth", fine)
    report = gpu_report.run_report(smoke_plan(), tmp_path, ["depth", "seed"])
    assert list(report["sections"]) == ["seed", "depth"]  # importance order, whatever the order asked
    seed, depth = report["sections"]["seed"], report["sections"]["depth"]
    assert (seed["status"], seed["error"], seed["data"]) == ("failed", "RuntimeError: boom second line", {"half": 1})
    assert depth["status"] == "ok"
    assert "status: failed" in (tmp_path / "summary.md").read_text()


def test_a_run_cut_short_leaves_the_finished_sections(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def measured(run, section):
        section["data"]["searches"] = [{"cap": "c", "variant": "plain", "value": 7, "status": "ok"}]

    def killed(run, section):
        section["data"]["searches"] = [{"cap": "c", "variant": "frugal", "value": 9, "status": "ok"}]
        run.save()  # what sections do after each cell or search
        raise KeyboardInterrupt

    monkeypatch.setitem(SECTION_RUNNERS, "max-batch", measured)
    monkeypatch.setitem(SECTION_RUNNERS, "depth", killed)
    with pytest.raises(KeyboardInterrupt):
        gpu_report.run_report(smoke_plan(), tmp_path, ["max-batch", "depth", "correctness"])
    report = _report(tmp_path)
    assert not report["complete"]
    sections = report["sections"]
    assert sections["max-batch"]["status"] == "ok" and sections["max-batch"]["data"]["searches"][0]["value"] == 7
    assert sections["depth"]["status"] == "running" and sections["depth"]["data"]["searches"][0]["value"] == 9
    assert sections["correctness"]["status"] == "pending"
    assert "INCOMPLETE" in (tmp_path / "summary.md").read_text()
    assert not list(tmp_path.glob("*.tmp"))


def test_search_doubles_bisects_and_keeps_bounds_when_cut_short(tmp_path: Path):
    run = Run(smoke_plan(), tmp_path, ["depth"], "", lambda text: None)
    run.deadline = float("inf")
    probes = []

    def fits(n: int) -> bool:
        probes.append(n)
        return n <= 37

    entry = {}
    search(run, fits, 4, 1024, 1, entry)
    assert (entry["value"], entry["first_failure"], entry["status"]) == (37, 38, "ok")
    assert probes[:5] == [4, 8, 16, 32, 64] and entry["probes"] == len(probes) <= 10
    entry = {}
    search(run, fits, 8, 1024, 8, entry)  # in units of 8: the largest multiple of 8 that fits
    assert entry["value"] == 32

    def slow_fits(n: int) -> bool:
        if len(probes) >= 3:
            raise OutOfTime("spent")
        probes.append(n)
        return True

    probes.clear()
    entry = {}
    with pytest.raises(OutOfTime):
        search(run, slow_fits, 4, 1024, 1, entry)
    assert (entry["status"], entry["value"], entry["lower_bound"]) == ("out of time", 16, True)


def test_busy_time_is_the_union_of_intervals():
    assert busy_time([]) == 0
    assert busy_time([(0, 2), (1, 3), (5, 6)]) == 4  # overlapping kernels count once
    assert busy_time([(0, 10), (2, 3), (4, 12)]) == 12  # nested CPU ops too


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


@pytest.mark.slow
def test_smoke_compares_the_planners_prediction_with_a_measured_step(smoke):
    out, _ = smoke
    section = _report(out)["sections"]["prediction"]
    rows = {r["variant"]: r for r in section["data"]["rows"]}
    assert set(rows) == {"tv-plain", "tv", "timm", "plain", "efficient", "frugal"}
    for row in rows.values():
        assert row["status"] == "ok" and len(row["points"]) == 2, row
        assert all(abs(p["rel_error"]) <= 0.10 for p in row["points"]), row
    assert [g["passed"] for g in section["goals"]] == [True]
    assert "predicted peak MiB" in (out / "summary.md").read_text()


def test_peer_names_mean_what_they_mean_in_bench():
    from effidense.gpu_report import VARIANTS
    from effidense.harness import PEERS, build_variant
    from effidense.modelspec import resolve_model

    spec = resolve_model("custom", dict(growth_rate=4, block_config=(1, 1), num_init_features=8))
    for peer, description in PEERS.items():
        assert VARIANTS[peer] == description
        ours, bench = build_model(peer, spec, {}), build_variant(peer, spec)
        assert type(ours) is type(bench)
        flags = {m.memory_efficient for m in ours.modules() if hasattr(m, "memory_efficient")}
        assert flags == ({peer == "tv"} if peer in ("tv", "tv-plain") else set())  # timm's and MONAI's have none


@pytest.mark.slow
def test_smoke_measures_volumes_against_monai(smoke):
    out, _ = smoke
    section = _report(out)["sections"]["3d"]
    cells = section["data"]["cells"]
    assert [c["edge"] for c in cells] == [16, 20]
    for cell in cells:
        rows = cell["rows"]
        assert set(rows) == {"monai", "plain", "efficient", "frugal"}
        assert all(r["status"] == "ok" for r in rows.values()), rows
        assert rows["efficient"]["memory_x_less_vs_monai"] > 1 and rows["frugal"]["memory_x_less_vs_monai"] > 1
    assert len(section["goals"]) == 2
    assert "x less than MONAI" in (out / "summary.md").read_text()
