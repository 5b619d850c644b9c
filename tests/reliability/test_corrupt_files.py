"""A damaged file in a run directory (truncated, garbage, not JSON, broken safetensors) is one
line, exit 2, on resume and on report: it names the file and says what to do (what to delete
and what is then done again, or --restart). Doing what it says lets the run finish."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

import factmem
from factmem.cli import main
from factmem.errors import FactmemError
from factmem.train.checkpoint import StageCheckpointer

from .test_bad_inputs import write_config

ARGS = ["--no-progress", "--set", "train.batch_size=2", "--set", "train.stop.epochs=2",
        "--set", "output.checkpoint_every=2"]


class _Stop(Exception):
    pass


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory) -> Path:
    """`finished/`: a finished run; `stopped/`: one stopped in stage 2 after its checkpoint at
    step 2 (stage 1 finished, its weights kept in resume/final)."""
    tmp = tmp_path_factory.mktemp("corrupt")
    for name in ("finished", "stopped"):
        (tmp / name).mkdir()
        write_config(tiny_model_dir, tmp / name)
    assert main(["run", str(tmp / "finished" / "exp.yaml"), *ARGS]) == 0
    original = StageCheckpointer.on_step_end

    def stop_in_stage2(self, ctx, row):
        original(self, ctx, row)
        if "02-stage2" in str(self.dir) and ctx.step == 2:
            raise _Stop

    mp = pytest.MonkeyPatch()
    mp.setattr(StageCheckpointer, "on_step_end", stop_in_stage2)
    try:
        with pytest.raises(_Stop):
            main(["run", str(tmp / "stopped" / "exp.yaml"), *ARGS])
    finally:
        mp.undo()
    seed = tmp / "stopped" / "runs" / "tiny" / "default" / "seed0"
    assert (seed / "02-stage2" / "resume" / "step-000002" / "state.json").is_file()
    assert (seed / "01-stage1" / "resume" / "final" / "model.safetensors").is_file()
    return tmp


def copy(runs: Path, which: str, dest: Path) -> tuple[Path, Path]:
    """A copy of a run and its config, as if made at `dest` (the config names output.dir)."""
    shutil.copytree(runs / which, dest)
    run = dest / "runs" / "tiny"
    for path in (dest / "exp.yaml", run / "config.yaml", run / "resolved.json"):
        path.write_text(path.read_text().replace(str(runs / which), str(dest)))
    return dest / "exp.yaml", run


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


SEED = "default/seed0"
STEP = f"{SEED}/02-stage2/resume/step-000002"
FINAL = f"{SEED}/01-stage1/resume/final"
# (run, damaged file, what the message says will be done again)
CASES = {
    "accuracy.json": ("finished", f"{SEED}/accuracy.json", f"{SEED} is trained again"),
    "metrics.json": ("stopped", f"{SEED}/01-stage1/metrics.json", f"{SEED} is trained again"),
    "base metrics.json": ("stopped", f"{SEED}/00-base/metrics.json", f"{SEED} is trained again"),
    "stage weights": ("stopped", f"{FINAL}/model.safetensors", f"{SEED} is trained again"),
    "stage weights' RNG": ("stopped", f"{FINAL}/rng.safetensors", f"{SEED} is trained again"),
    "stage weights' state": ("stopped", f"{FINAL}/state.json", f"{SEED} is trained again"),
    "checkpoint weights": ("stopped", f"{STEP}/model.safetensors",
                           "stage stage2 of default/seed0 restarts from its beginning"),
    "checkpoint optimizer": ("stopped", f"{STEP}/optimizer.safetensors",
                             "stage stage2 of default/seed0 restarts from its beginning"),
    "checkpoint state": ("stopped", f"{STEP}/state.json",
                         "stage stage2 of default/seed0 restarts from its beginning"),
}


def refused(runs: Path, case: str, dest: Path, capsys) -> tuple[Path, Path, str]:
    """Damage the file of `case` in a copy of its run and run again: one line, exit 2."""
    which, rel, redo = CASES[case]
    cfg, run = copy(runs, which, dest)
    damaged = run / rel
    truncate(damaged)
    assert main(["run", str(cfg), *ARGS]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"factmem: error: {damaged}: corrupted or truncated ("), err
    assert err.count("\n") == 1 and redo in err and "or pass --restart" in err, err
    assert not (run.parent / ".tiny.lock").exists()
    return cfg, run, err


@pytest.mark.parametrize("case", list(CASES))
def test_a_damaged_run_file_on_resume_is_one_line(case, runs, tmp_path, capsys):
    refused(runs, case, tmp_path / "copy", capsys)


def follow_the_advice(cfg: Path, run: Path, err: str) -> None:
    delete = Path(re.search(r"; delete (\S+) and run `factmem run` again", err).group(1))
    assert run in delete.parents
    shutil.rmtree(delete) if delete.is_dir() else delete.unlink()
    assert main(["run", str(cfg), *ARGS]) == 0
    assert (run / SEED / "accuracy.json").is_file()


def test_following_the_advice_finishes_the_run(runs, tmp_path, capsys):
    follow_the_advice(*refused(runs, "checkpoint state", tmp_path / "copy", capsys))


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in CASES if c != "checkpoint state"])
def test_following_the_advice_finishes_the_run_for_every_file(case, runs, tmp_path, capsys):
    follow_the_advice(*refused(runs, case, tmp_path / "copy", capsys))


@pytest.mark.parametrize("name", ["resolved.json", "config.yaml", "timing.json"])
def test_a_damaged_file_of_the_run_itself_is_one_line(name, runs, tmp_path, capsys):
    cfg, run = copy(runs, "finished", tmp_path / "copy")
    (run / name).write_bytes(b"\x00\xff{garbage")
    assert main(["run", str(cfg), *ARGS]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"factmem: error: {run / name}: corrupted or truncated ("), err
    assert err.count("\n") == 1 and "--restart" in err, err


def test_report_and_load_run_name_a_damaged_file(runs, tmp_path, capsys):
    cfg, run = copy(runs, "finished", tmp_path / "copy")
    metrics = run / SEED / "01-stage1" / "metrics.json"
    truncate(metrics)
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"factmem: error: {metrics}: corrupted or truncated ("), err
    assert err.count("\n") == 1, err
    cfg, run = copy(runs, "finished", tmp_path / "again")
    truncate(run / SEED / "accuracy.json")
    with pytest.raises(FactmemError, match="accuracy.json: corrupted or truncated"):
        factmem.load_run(run)


def test_a_model_with_damaged_weights_is_one_line(runs, tiny_model_dir, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    truncate(model / "model.safetensors")
    cfg = write_config(model, tmp_path)
    assert main(["run", str(cfg), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"factmem: error: model '{model}': cannot load") and \
        err.count("\n") == 1, err
    assert not (tmp_path / "runs" / ".tiny.lock").exists()
