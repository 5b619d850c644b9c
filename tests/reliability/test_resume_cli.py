"""The real CLI killed with SIGKILL in the middle of a stage, then run again with the same
command: it continues and every result file equals an uninterrupted run's. While the first run
is alive, a second one on the same directory is refused; a changed config is refused."""

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from factmem.cli import main
from factmem.rundir import METRICS_WALL_TIME, RunLock

SRC = str(Path(__file__).resolve().parents[2] / "src")


def config(model_dir: Path, tmp: Path, stage2_epochs: int = 8) -> Path:
    cfg = {
        "name": "tiny",
        "model": {"name": str(model_dir)},
        "train": {"lr": 3e-3, "batch_size": 2, "stop": {"rule": "epochs", "epochs": 2}},
        "sets": {"kvr_a": {"source": "kvr", "n": 6, "key_length": 4, "value_length": 3},
                 "kvr_b": {"source": "kvr", "n": 6, "offset": 2000, "key_length": 4,
                           "value_length": 3}},
        "stages": [{"name": "stage1", "set": "kvr_a"},
                   {"name": "stage2", "set": "kvr_b",
                    # a mixed stage: resume must also reproduce mixed, packed batches
                    "mix": [{"source": "random-words", "ratio": 1, "length": 4}],
                    "train": {"stop": {"rule": "loss_below", "threshold": 1e-9,
                                       "epochs": stage2_epochs}}}],
        # naive and replay share stage 1: it is trained once and reused (StageReuse)
        "variants": {"naive": {},
                     "replay": {"stages.stage2.replay": [{"stage": "stage1", "ratio": 0.5}]}},
        "output": {"dir": str(tmp / "runs"), "checkpoint_every": 2},
    }
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def result_files(run: Path) -> dict[str, str]:
    """Every result file of the run, the timings (wall seconds) removed from metrics."""
    out = {}
    for p in sorted(run.rglob("*")):
        rel = str(p.relative_to(run))
        if not p.is_file() or rel in ("timing.json", "config.yaml") or "/checkpoint/" in rel:
            continue
        if p.name == "reused_from.json":  # holds the absolute path of the source
            out[rel] = "reused"
            continue
        if p.suffix == ".safetensors":  # e.g. EWC's fisher.safetensors: compared by content
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            continue
        text = p.read_text()
        if p.name == "metrics.json":
            data = json.loads(text)
            for key in METRICS_WALL_TIME:
                data.pop(key, None)
            text = json.dumps(data, sort_keys=True)
        out[rel] = text
    return out


@pytest.mark.slow
def test_sigkill_mid_stage_then_resume_equals_uninterrupted_run(tiny_model_dir, tmp_path, capsys,
                                                                  caplog):
    cfg = config(tiny_model_dir, tmp_path)
    assert main(["run", str(cfg), "--no-progress", "--output", str(tmp_path / "ref")]) == 0
    reference = result_files(tmp_path / "ref" / "tiny")

    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "factmem", "run", str(cfg), "--no-progress",
                             "--output", str(out)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    stage2 = out / "tiny" / "naive" / "seed0" / "02-stage2"
    deadline = time.time() + 300
    while not list(stage2.glob("resume/step-*/state.json")):  # mid-stage 2, a checkpoint taken
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "the run never reached stage 2"
        time.sleep(0.02)

    # a second run on the same directory while the first is alive: refused, exit 2
    capsys.readouterr()
    assert main(["run", str(cfg), "--no-progress", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"is in use by process {proc.pid}@" in err and err.count("\n") == 1, err

    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert not (stage2 / "metrics.json").exists(), "killed too late: stage 2 had finished"
    assert (out / ".tiny.lock").exists()  # left behind by the kill: stale
    stage1_metrics = (out / "tiny" / "naive" / "seed0" / "01-stage1" / "metrics.json").stat()

    caplog.set_level(logging.INFO, logger="factmem")
    assert main(["run", str(cfg), "--no-progress", "--output", str(out)]) == 0
    assert "removing stale lock" in caplog.text
    assert "resuming from" in caplog.text and "stages 1-1 finished earlier" in caplog.text
    # stage 1 was not redone; naive's stage 1 was still reused by replay
    assert (out / "tiny" / "naive" / "seed0" / "01-stage1" / "metrics.json").stat().st_mtime_ns \
        == stage1_metrics.st_mtime_ns
    assert (out / "tiny" / "replay" / "seed0" / "01-stage1" / "reused_from.json").is_file()
    resumed = result_files(out / "tiny")
    assert sorted(resumed) == sorted(reference)
    for name, text in reference.items():
        assert resumed[name] == text, name
    # finished: no temporary weights, no lock
    assert not list((out / "tiny").rglob("resume")) and not (out / ".tiny.lock").exists()
    # timing.json holds a real figure for every variant/seed, the killed one included: its
    # stage 1 (trained before the kill) and stage 2's steps on both sides of the kill count
    timing = json.loads((out / "tiny" / "timing.json").read_text())
    assert sorted(timing) == ["naive/seed0", "replay/seed0"] and min(timing.values()) > 0
    seed0 = out / "tiny" / "naive" / "seed0"
    stage1 = json.loads((seed0 / "01-stage1" / "metrics.json").read_text())
    stage2 = json.loads((seed0 / "02-stage2" / "metrics.json").read_text())
    assert 0 < stage2["resumed_after_seconds"] < stage2["seconds"]
    assert timing["naive/seed0"] >= stage1["seconds"] + stage2["seconds"] - 0.02  # rounding


def test_changed_config_is_refused_naming_keys_and_restart_starts_over(tiny_model_dir, tmp_path,
                                                                       capsys):
    cfg = config(tiny_model_dir, tmp_path, stage2_epochs=1)
    short = ["--set", "variants=!replace {}", "--set", "stages=[{name: stage1, set: kvr_a}]"]
    assert main(["run", str(cfg), "--no-progress", *short]) == 0
    run = tmp_path / "runs" / "tiny"
    before = result_files(run)
    capsys.readouterr()
    assert main(["run", str(cfg), "--no-progress", *short, "--set", "train.lr=1e-3",
                 "--set", "seeds=[0, 1]"]) == 2
    err = capsys.readouterr().err
    assert "holds a different config (changed: train.lr, seeds)" in err, err
    assert "--restart" in err and err.count("\n") == 1
    assert result_files(run) == before
    # the same command again: everything is finished, nothing is redone, and timing.json keeps
    # the seconds the first run measured (not the ~0 s of skipping)
    stamp = (run / "default" / "seed0" / "accuracy.json").stat().st_mtime_ns
    timing = json.loads((run / "timing.json").read_text())
    assert timing["default/seed0"] > 0
    assert main(["run", str(cfg), "--no-progress", *short]) == 0
    assert (run / "default" / "seed0" / "accuracy.json").stat().st_mtime_ns == stamp
    assert json.loads((run / "timing.json").read_text()) == timing
    # a run dir without timing.json (killed before it was written, or older): the seconds of
    # the stages it trained, read from their metrics
    (run / "timing.json").unlink()
    assert main(["run", str(cfg), "--no-progress", *short]) == 0
    stage1 = json.loads((run / "default" / "seed0" / "01-stage1" / "metrics.json").read_text())
    assert json.loads((run / "timing.json").read_text()) == {
        "default/seed0": round(stage1["seconds"], 2)}
    assert main(["run", str(cfg), "--no-progress", *short, "--set", "train.lr=1e-3",
                 "--restart"]) == 0
    assert json.loads((run / "resolved.json").read_text())["default"]["train"]["lr"] == 1e-3


def test_lock_refuses_a_live_owner_and_takes_over_a_dead_one(tmp_path):
    root = tmp_path / "runs" / "x"
    with RunLock(root), pytest.raises(Exception, match=f"in use by process {os.getpid()}@"):
        RunLock(root).acquire()
    assert not (tmp_path / "runs" / ".x.lock").exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    (tmp_path / "runs" / ".x.lock").write_text(f"{dead.pid}@{socket.gethostname()}\n")
    lock = RunLock(root)
    lock.acquire()  # stale: its process is gone
    assert (tmp_path / "runs" / ".x.lock").read_text().startswith(f"{os.getpid()}@")
    lock.release()


def test_a_variant_seed_stopped_part_way_is_timed_across_both_runs(tmp_path):
    """timing.json for a variant/seed an earlier run stopped: this run's wall seconds, plus the
    seconds of the stages the earlier run finished and of the part of a stage it had trained
    (the stage's `resumed_after_seconds`); stages copied from another variant add nothing."""
    from types import SimpleNamespace

    from factmem import rundir

    stages = [SimpleNamespace(name=n, set=n) for n in ("stage1", "stage2", "stage3")]
    cfg = SimpleNamespace(stages=stages)
    seed_dir = tmp_path / "run" / "v" / "seed0"

    def finish(k: int, **metrics) -> Path:
        d = rundir.stage_path(seed_dir, cfg, k) if k >= 0 else rundir.base_dir(seed_dir)
        d.mkdir(parents=True, exist_ok=True)
        (d / "metrics.json").write_text(json.dumps({"eval": {}, **metrics}))
        return d

    finish(-1)  # the base evaluation: no training seconds
    finish(0, seconds=100.0)  # stage 1, finished by the earlier run
    timings = rundir.RunTimings(tmp_path / "run")
    timings.begin("v/seed0", cfg, seed_dir)
    finish(1, seconds=70.0, resumed_after_seconds=30.0)  # 30 s before the stop, 40 s now
    finish(2, seconds=50.0)  # stage 3, trained now
    timings.record("v/seed0", 95.5)  # this run's wall seconds
    assert json.loads((tmp_path / "run" / "timing.json").read_text()) == {"v/seed0": 225.5}

    # a stage copied from another variant/seed (reused_from.json) was not trained by this one
    (rundir.stage_path(seed_dir, cfg, 0) / rundir.REUSED_FROM_FILE).write_text("{}")
    again = rundir.RunTimings(tmp_path / "run")
    again.begin("v/seed0", cfg, seed_dir)
    again.record("v/seed0", 10.0)
    assert again.seconds["v/seed0"] == 10.0 + 70.0 + 50.0
