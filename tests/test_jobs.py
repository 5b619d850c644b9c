"""`factmem run --jobs N`: variant/seed runs in parallel worker processes give the files one
process gives; a run that copies another's stage waits for it; a failing worker is named in one
line while the others' results stay; refused under `accelerate launch`."""

import json
import logging
from pathlib import Path

import pytest
from reliability.test_resume_cli import result_files
from reliability.test_reuse_from_disk import config as reuse_config

from factmem.cli import main


def config(model_dir: Path, tmp: Path, **variants) -> Path:
    """The stage-reuse test's two-stage tiny run, seeds 0 and 1: replay copies naive's stage 1,
    so with --jobs it starts once naive's stage 1 is on disk."""
    return reuse_config(model_dir, tmp, variants or None, seeds=[0, 1])


@pytest.mark.slow
def test_two_jobs_give_the_results_of_one(tiny_model_dir, tmp_path, caplog, capsys):
    cfg = config(tiny_model_dir, tmp_path)
    assert main(["run", str(cfg), "--no-progress", "--output", str(tmp_path / "one")]) == 0
    one = capsys.readouterr().out
    caplog.set_level(logging.INFO, logger="factmem")
    caplog.clear()
    assert main(["run", str(cfg), "--no-progress", "--output", str(tmp_path / "two"),
                 "--jobs", "2"]) == 0
    two = capsys.readouterr().out
    assert two == one.replace(str(tmp_path / "one"), str(tmp_path / "two"))  # the same table
    root = tmp_path / "two" / "tiny"
    files = result_files(root)
    logs = sorted(n for n in files if n.startswith("logs/"))
    assert logs == [f"logs/{v}/seed{s}.log" for v in ("naive", "replay") for s in (0, 1)]
    assert sorted(n for n in files if n not in logs) == sorted(result_files(tmp_path / "one"
                                                                             / "tiny"))
    for name, text in result_files(tmp_path / "one" / "tiny").items():
        assert files[name] == text, name
    for s in (0, 1):
        assert (root / f"replay/seed{s}/01-stage1/reused_from.json").is_file()
    assert not list(root.rglob("resume"))
    timing = json.loads((root / "timing.json").read_text())
    assert sorted(timing) == [f"{v}/seed{s}" for v in ("naive", "replay") for s in (0, 1)]
    assert min(timing.values()) > 0
    # the parent's lines: one per stage and one per variant/seed
    assert "2 jobs" in caplog.text
    assert caplog.text.count("replay seed1 stage1: copied from naive/seed1") == 1
    assert caplog.text.count("replay seed0 stage2: trained") == 1
    assert caplog.text.count(" finished (") == 4


@pytest.mark.slow
def test_a_failing_worker_is_named_and_the_others_results_stay(tiny_model_dir, tmp_path,
                                                                capsys):
    # lr 1e30 overflows at step 2: the stage stops with a FactmemError in its worker
    cfg = config(tiny_model_dir, tmp_path, naive={},
                 exploding={"train.lr": 1e30, "train.warmup_fraction": 0})
    assert main(["run", str(cfg), "--no-progress", "--jobs", "2", "--set", "seeds=[0]"]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert err.count("factmem: error:") == 1 and last.startswith(
        "factmem: error: exploding seed0 failed: exploding seed0 stage1: non-finite loss"), err
    root = tmp_path / "runs" / "tiny"
    assert f"{root}/logs/exploding/seed0.log" in last
    assert (root / "naive" / "seed0" / "accuracy.json").is_file()  # finished and kept
    assert not (root / "summary.json").exists()
    assert not (tmp_path / "runs" / ".tiny.lock").exists()


def test_jobs_are_refused_under_accelerate_launch(tiny_model_dir, tmp_path, capsys,
                                                   monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = config(tiny_model_dir, tmp_path)
    assert main(["run", str(cfg), "--no-progress", "--jobs", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("factmem: error: --jobs 2:") and "accelerate launch" in err
    assert err.count("\n") == 1
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args, message", [
    (["--jobs", "0"], "--jobs: must be >= 1, got 0"),
    (["--jobs", "2", "--threads-per-job", "0"], "--threads-per-job: must be >= 1, got 0"),
])
def test_bad_job_counts_are_refused_in_one_line(tiny_model_dir, tmp_path, capsys, args, message):
    cfg = config(tiny_model_dir, tmp_path)
    assert main(["run", str(cfg), "--no-progress", *args]) == 2
    err = capsys.readouterr().err
    assert err == f"factmem: error: {message}\n"
    assert not (tmp_path / "runs").exists()
