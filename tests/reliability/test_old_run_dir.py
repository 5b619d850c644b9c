"""A run directory written by an older factmem (tests/fixtures/old_run, made at commit d075f97
by tests/fixtures/make_old_run.py, killed in its last stage) still resumes, reads, analyzes
and reports with today's code, and resuming it ends where a fresh run of the same config ends."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import factmem
from factmem.cli import main

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "old_run"


def copy_fixture(dest: Path) -> Path:
    shutil.copytree(FIXTURE, dest)
    return dest


def losses(stage_dir: Path) -> list[float]:
    rows = (stage_dir / "train_log.jsonl").read_text().splitlines()
    return [json.loads(r)["loss"] for r in rows]


def test_a_partial_old_run_reads_with_the_python_api(tmp_path, monkeypatch):
    old = copy_fixture(tmp_path / "old")
    run = factmem.load_run(old / "runs" / "old")
    stages = set(run.accuracy["stage"])
    assert {"base", "stage1", "stage2"} <= stages  # naive finished, remix's stage 2 did not
    assert set(run.accuracy["variant"]) == {"naive", "remix"}
    assert len(run.predictions) > 0


@pytest.mark.slow
def test_an_old_run_resumes_analyzes_and_reports(tmp_path, monkeypatch, caplog):
    old = copy_fixture(tmp_path / "old")
    fresh = copy_fixture(tmp_path / "fresh")
    shutil.rmtree(fresh / "runs")

    monkeypatch.chdir(fresh)  # the config names its model as ./model
    assert main(["run", "config.yaml", "--no-progress"]) == 0
    caplog.set_level("INFO", logger="factmem")
    monkeypatch.chdir(old)
    assert main(["run", "config.yaml", "--no-progress"]) == 0
    assert "resuming from" in caplog.text  # remix's stage 2 from its in-stage checkpoint
    assert "naive seed0: finished in an earlier run, skipped" in caplog.text

    got, want = old / "runs" / "old", fresh / "runs" / "old"
    # naive's stages (12 steps) warm up for 1 step under the old rounding and today's ceiling;
    # remix's (24 steps) warmed up for round(1.2) = 1 step when the fixture was made and take
    # ceil(1.2) = 2 today, so only naive can equal a fresh run. remix must still resume and end.
    for variant in ("naive",):
        a = json.loads((got / variant / "seed0" / "accuracy.json").read_text())
        b = json.loads((want / variant / "seed0" / "accuracy.json").read_text())
        assert a["accuracy"] == b["accuracy"], variant
        for stage in ("01-stage1", "02-stage2"):
            assert losses(got / variant / "seed0" / stage) == pytest.approx(
                losses(want / variant / "seed0" / stage), rel=1e-4)
    resumed = json.loads((got / "remix" / "seed0" / "accuracy.json").read_text())
    assert set(resumed["accuracy"]) == {"base", "stage1", "stage2"}
    assert len(losses(got / "remix" / "seed0" / "02-stage2")) == 24
    assert not list(got.rglob("resume"))

    assert main(["analyze", "runs/old", "--what", "retention,graded,lens", "--no-progress"]) == 0
    for table in ("retention", "graded", "lens_layers"):
        assert (got / "analysis" / f"{table}.jsonl").stat().st_size > 0, table
    assert main(["report", "runs/old"]) == 0
    text = (got / "report.md").read_text()
    assert "naive" in text and "remix" in text
