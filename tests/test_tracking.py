"""Experiment tracking: a tiny two-stage run with `report_to: [tensorboard]` writes event files
that tensorboard's own reader reads back, with the scalars and step numbers of the run's files."""

import json
from pathlib import Path

import pytest
from test_cli import tiny_config

from factmem.cli import main


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def same_points(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> bool:
    """Equal steps, equal values (TensorBoard stores float32)."""
    return ([s for s, _ in got] == [s for s, _ in want]
            and [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_tensorboard_gets_steps_memorization_retention_and_accuracy(tiny_model_dir, tmp_path):
    pytest.importorskip("tensorboard")
    cfg = tiny_config(
        tiny_model_dir, tmp_path, eval={"retention_every": 2},
        stages=[{"name": "stage1", "set": "kvr_a"},
                {"name": "stage2", "set": "kvr_b",
                 "train": {"stop": {"rule": "until_memorized", "epochs": 2}}}],
        variants={"naive": {}, "replay": {"stages.stage2.replay": [{"stage": "stage1",
                                                                    "ratio": 0.5}]}},
        output={"dir": str(tmp_path / "runs"), "report_to": ["tensorboard"]})
    assert main(["run", str(cfg), "--no-progress"]) == 0
    root = tmp_path / "runs" / "tiny"
    for variant in ("naive", "replay"):  # replay's stage 1 is copied from naive's: logged too
        seed = root / variant / "seed0"
        got = scalars(root / "tensorboard" / "tiny" / variant / "seed0")
        logs = [read_jsonl(seed / d / "train_log.jsonl") for d in ("01-stage1", "02-stage2")]
        n1 = len(logs[0])
        rows = logs[0] + [{**r, "step": n1 + r["step"]} for r in logs[1]]  # steps run on
        assert [s for s, _ in got["train/loss"]] == list(range(1, len(rows) + 1))
        for tag, key in (("train/loss", "loss"), ("train/lr", "lr"), ("train/tok_acc", "tok_acc")):
            assert [v for _, v in got[tag]] == pytest.approx([r[key] for r in rows], rel=1e-6)
        assert [v for _, v in got["train/stage"]] == [1] * n1 + [2] * len(logs[1])
        memorized = [(r["step"], r["memorized_accuracy"]) for r in rows
                     if "memorized_accuracy" in r]
        assert memorized and same_points(got["train/memorized_accuracy"], memorized)
        acc = json.loads((seed / "accuracy.json").read_text())
        for name in ("kvr_a", "kvr_b"):
            assert same_points(got[f"eval/{name}/accuracy"], [
                (0, acc["accuracy"]["base"][name]), (n1, acc["accuracy"]["stage1"][name]),
                (len(rows), acc["accuracy"]["stage2"][name])])
            assert same_points(got[f"eval/{name}/token_acc"], [
                (0, acc["token_acc"]["base"][name]), (n1, acc["token_acc"]["stage1"][name]),
                (len(rows), acc["token_acc"]["stage2"][name])])
        retention = read_jsonl(seed / "01-stage1" / "retention.jsonl")
        steps = sorted({r["step"] for r in retention})
        assert steps[0] == 0 and steps[-1] == n1  # the stage as found, every 2 steps, the end
        first = [r for r in retention if r["step"] == 2 and r["set"] == "kvr_b"]
        point = dict(got["retention/kvr_b/token_acc"])[2]
        assert point == pytest.approx(sum(r["token_acc"] for r in first) / len(first), rel=1e-6)
        stage2_steps = [s for s, _ in got["retention/kvr_a/exact_match"] if s > n1]
        assert stage2_steps and stage2_steps[-1] == len(rows)  # stage 2 continues the count
    hparams = list((root / "tensorboard" / "tiny" / "naive" / "seed0").glob("*/hparams.yml"))
    assert hparams and "train.lr: 0.003" in hparams[0].read_text()
    assert "seed: 0" in hparams[0].read_text()


def test_wandb_gets_project_run_name_config_and_increasing_steps(tiny_model_dir, tmp_path,
                                                                 monkeypatch):
    """wandb through accelerate's WandBTracker, with a stand-in `wandb` module (not installed
    here): project = experiment, run name = experiment/variant/seed, the resolved config, and
    steps that never go back (wandb drops such points), reused stages included."""
    import sys
    import types

    import accelerate.tracking

    runs: list[dict] = []

    class Run:
        def __init__(self, **kwargs):
            self.kwargs, self.logged, self.finished = kwargs, [], False
            runs.append(self.__dict__)

        def log(self, values, step=None):
            self.logged.append((step, dict(values)))

        def finish(self):
            self.finished = True

    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: Run(**kwargs)
    fake.config = types.SimpleNamespace(update=lambda values, allow_val_change: runs[-1].update(
        config=dict(values)))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: ["wandb"])
    cfg = tiny_config(tiny_model_dir, tmp_path, eval={"retention_every": 2},
                      output={"dir": str(tmp_path / "runs"), "report_to": ["wandb"]})
    assert main(["run", str(cfg), "--no-progress"]) == 0
    assert [r["kwargs"] for r in runs] == [{"project": "tiny", "name": f"tiny/{v}/seed0"}
                                           for v in ("naive", "remix", "replay")]
    for r in runs:
        assert r["finished"] and r["config"]["train.lr"] == 0.003 and r["config"]["seed"] == 0
        steps = [step for step, _ in r["logged"]]
        assert steps == sorted(steps) and steps[0] == 0
        tags = {k for _, values in r["logged"] for k in values}
        assert {"train/loss", "eval/kvr_a/accuracy", "retention/kvr_b/token_acc"} <= tags
    replay = {k: [(s, v[k]) for s, v in runs[2]["logged"] if k in v] for k in ("train/loss",)}
    naive = {k: [(s, v[k]) for s, v in runs[0]["logged"] if k in v] for k in ("train/loss",)}
    n1 = 2 * 2  # stage 1: 2 epochs x 2 steps, copied from naive into replay
    assert replay["train/loss"][:n1] == naive["train/loss"][:n1]


def test_no_tracker_no_tensorboard_directory(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, tmp_path, variants={"naive": {}})
    assert main(["run", str(cfg), "--no-progress"]) == 0
    assert not (tmp_path / "runs" / "tiny" / "tensorboard").exists()


@pytest.mark.slow
def test_only_the_main_process_logs(tiny_model_dir, tmp_path):
    """Two processes (`accelerate launch`, gloo): one event file per run, every step once."""
    pytest.importorskip("tensorboard")
    import yaml
    from test_multiprocess import launch, mp_config

    cfg = mp_config(tiny_model_dir, tmp_path, epochs=2)
    raw = yaml.safe_load(cfg.read_text())
    cfg.write_text(yaml.safe_dump({**raw, "output": {"report_to": ["tensorboard"]}}))
    proc = launch(cfg, tmp_path / "two", 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "two" / "mp" / "tensorboard" / "mp" / "naive" / "seed0"
    assert len(list(run.glob("events.out.tfevents.*"))) == 1
    assert len(list(run.glob("*/hparams.yml"))) == 1
    assert [s for s, _ in scalars(run)["train/loss"]] == list(range(1, 9))  # 2 x (2 x 2 steps)
