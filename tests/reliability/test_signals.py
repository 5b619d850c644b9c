"""SIGTERM (what cluster schedulers send before a kill) stops a run cleanly: in training, the
current step finishes and a resumable checkpoint is written; elsewhere the work in progress is
dropped (what is finished is on disk). The lock is released, one line is printed and the exit
status is 143. The same command again continues, and ends where an uninterrupted run ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from factmem.cli import main
from factmem.train.loop import _Run

from .test_bad_inputs import write_config
from .test_resume_cli import SRC, result_files

ARGS = ["--no-progress", "--set", "train.batch_size=2", "--set", "train.stop.epochs=2",
        "--set", "output.checkpoint_every=2"]
SEED = Path("tiny") / "default" / "seed0"


class Unhandled(Exception):
    """Raised by the test's own SIGTERM handler: factmem did not handle the signal."""


@pytest.fixture
def test_handler():
    """A SIGTERM handler of the test's own, so that a run that does not install one fails the
    test instead of killing pytest; restored afterwards."""
    def handler(signum, frame):
        raise Unhandled("SIGTERM reached the test's handler: factmem did not handle it")

    previous = signal.signal(signal.SIGTERM, handler)
    yield handler
    signal.signal(signal.SIGTERM, previous)


def results(run: Path) -> dict[str, str]:
    """The run's result files but resolved.json (it names output.dir, a directory per test)."""
    return {k: v for k, v in result_files(run).items() if k != "resolved.json"}


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("reference")
    cfg = write_config(tiny_model_dir, tmp)
    assert main(["run", str(cfg), *ARGS]) == 0
    return results(tmp / "runs" / "tiny")


def sigterm_at(monkeypatch, where: str, **when) -> None:
    """Send SIGTERM to this process once, from inside the run: at a training step of a stage
    (`step=N`) or at the N-th evaluation of the tracked sets (`evaluation=N`)."""
    if "step" in when:
        original = _Run.step

        def step(self, batch):
            out = original(self, batch)
            if where in self.desc and self.ctx.step == when["step"]:
                os.kill(os.getpid(), signal.SIGTERM)
            return out

        monkeypatch.setattr(_Run, "step", step)
        return
    import factmem.seedrun as seedrun

    original_eval, calls = seedrun.evaluate_tracked, []

    def evaluate(run, stage_name, stage_dir):
        calls.append(stage_name)
        if len(calls) == when["evaluation"]:
            os.kill(os.getpid(), signal.SIGTERM)
        return original_eval(run, stage_name, stage_dir)

    monkeypatch.setattr(seedrun, "evaluate_tracked", evaluate)


def test_sigterm_in_a_training_step_checkpoints_releases_the_lock_and_resumes(
        tiny_model_dir, tmp_path, reference, monkeypatch, capsys, test_handler):
    cfg = write_config(tiny_model_dir, tmp_path)
    sigterm_at(monkeypatch, "stage2", step=3)
    assert main(["run", str(cfg), *ARGS]) == 143
    err = capsys.readouterr().err
    step = tmp_path / "runs" / SEED / "02-stage2" / "resume" / "step-000003"
    assert err.startswith("factmem: stopped by SIGTERM: "), err
    assert err.count("\n") == 1 and str(step) in err and "run the same command again" in err
    assert (step / "state.json").is_file()  # written for the signal (checkpoint_every is 2)
    assert not (step.parents[1] / "metrics.json").exists()
    assert not (tmp_path / "runs" / ".tiny.lock").exists()
    assert signal.getsignal(signal.SIGTERM) is test_handler  # the caller's handler is back

    monkeypatch.undo()
    assert main(["run", str(cfg), *ARGS]) == 0
    assert results(tmp_path / "runs" / "tiny") == reference


def test_sigterm_outside_training_drops_the_work_in_progress(
        tiny_model_dir, tmp_path, reference, monkeypatch, capsys, test_handler):
    cfg = write_config(tiny_model_dir, tmp_path)
    sigterm_at(monkeypatch, "", evaluation=2)  # evaluating after stage 1
    assert main(["run", str(cfg), *ARGS]) == 143
    err = capsys.readouterr().err
    assert err.startswith("factmem: stopped by SIGTERM: ") and err.count("\n") == 1, err
    assert "run the same command again" in err
    assert not (tmp_path / "runs" / ".tiny.lock").exists()
    assert not (tmp_path / "runs" / SEED / "01-stage1" / "metrics.json").exists()

    monkeypatch.undo()
    assert main(["run", str(cfg), *ARGS]) == 0
    assert results(tmp_path / "runs" / "tiny") == reference


@pytest.mark.slow
def test_sigterm_from_outside_the_process(tiny_model_dir, tmp_path, reference):
    """The real thing: the CLI in its own process, SIGTERM sent in stage 2 as a scheduler
    would."""
    cfg = write_config(tiny_model_dir, tmp_path)
    cmd = [sys.executable, "-m", "factmem", "run", str(cfg), *ARGS,
           "--set", "train.stop.epochs=40"]  # long enough a stage 2 to be signalled in
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    stage2 = tmp_path / "runs" / SEED / "02-stage2"
    deadline = time.time() + 300
    while not list(stage2.glob("resume/step-*/state.json")):
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.time() < deadline, "the run never reached stage 2"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("factmem: stopped by SIGTERM: ") and "step-" in last, last
    assert not (stage2 / "metrics.json").exists()
    assert not (tmp_path / "runs" / ".tiny.lock").exists()
    assert main(["run", str(cfg), *ARGS, "--set", "train.stop.epochs=40"]) == 0
    assert (tmp_path / "runs" / SEED / "accuracy.json").is_file()
