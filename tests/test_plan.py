"""`factmem run --dry-run` prints a plan; its counts are what the real run then records."""

import json
import math

from test_cli import tiny_config

from factmem.cli import main
from factmem.config import load_experiment
from factmem.experiment import prepare


def test_plan_counts_equal_the_real_runs_manifests_and_metrics(tiny_model_dir, tmp_path, capsys):
    """Every variant, seed and stage: items per component (manifest.json), steps and tokens
    (metrics.json) as planned; stages the plan calls copied are the ones the run reused."""
    cfg = tiny_config(tiny_model_dir, tmp_path, seeds=[0, 1])
    assert main(["run", str(cfg), "--dry-run", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "remix seed1 stage1: 12 items" in out and "total: 10 stage(s) to train" in out, out
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing

    plan = prepare(load_experiment(cfg)).plan
    assert len(plan.stages) == 3 * 2 * 2  # variants x seeds x stages
    assert main(["run", str(cfg), "--no-progress"]) == 0
    root = tmp_path / "runs" / "tiny"
    mix_ids: dict[int, set[str]] = {}
    for s in plan.stages:
        k = ["stage1", "stage2"].index(s.stage)
        stage_dir = root / s.variant / f"seed{s.seed}" / f"{k + 1:02d}-{s.stage}"
        manifest = json.loads((stage_dir / "manifest.json").read_text())
        assert [(c["role"], c["name"], c["count"]) for c in manifest["components"]] == [
            (c.role, c.name, c.items) for c in s.components], (s.variant, s.seed, s.stage)
        train = json.loads((stage_dir / "metrics.json").read_text())["train"]
        assert s.exact and train["epochs"] == s.epochs == 2
        assert train["steps"] == s.steps == s.steps_per_epoch * 2
        assert s.steps_per_epoch == math.ceil(s.items / 4)
        assert train["tokens"] == s.tokens == s.tokens_per_epoch * 2
        assert (stage_dir / "reused_from.json").is_file() == (s.reused_from is not None)
        if s.variant == "remix" and s.stage == "stage1":
            mix_ids[s.seed] = set(manifest["components"][1]["ids"])
    assert mix_ids[0] and mix_ids[0] != mix_ids[1]  # mixtures of every seed were planned
    # the dry run reads the run directory as the real run would, writing nothing
    capsys.readouterr()
    assert main(["run", str(cfg), "--dry-run"]) == 0
    assert "6 of 6 variant/seed runs finished" in capsys.readouterr().out
    assert main(["run", str(cfg), "--dry-run", "--set", "train.lr=1.0e-3"]) == 2
    assert "holds a different config (changed: train.lr" in capsys.readouterr().err


def test_plan_of_an_early_stopping_rule_is_an_upper_bound(tiny_model_dir, tmp_path, capsys):
    cfg = tiny_config(tiny_model_dir, tmp_path,
                      train={"lr": 3e-3, "batch_size": 4,
                             "stop": {"rule": "until_memorized", "epochs": 5}})
    assert main(["run", str(cfg), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "until_memorized, at most 5 epochs -> at most 10 steps" in out, out
    assert "at most 65 optimizer steps" in out, out  # naive 10+10, remix 15+15, replay 15


def test_plan_counts_reference_label_padding_as_the_loop_does(tiny_model_dir, tmp_path):
    """`label_padding: reference` pads every item to the stage's longest (labelled, trained on):
    the plan counts each item at that width, as metrics.json's tokens do."""
    cfg = tiny_config(tiny_model_dir, tmp_path, variants={"remix": {
        "stages.stage1.mix": [{"source": "random-words", "ratio": 1, "length": 4}]}},
        train={"lr": 3e-3, "batch_size": 4, "label_padding": "reference",
               "stop": {"rule": "epochs", "epochs": 1}})
    plan = prepare(load_experiment(cfg)).plan
    assert main(["run", str(cfg), "--no-progress"]) == 0
    for k, s in enumerate(plan.stages):
        stage_dir = tmp_path / "runs" / "tiny" / "remix" / "seed0" / f"{k + 1:02d}-{s.stage}"
        train = json.loads((stage_dir / "metrics.json").read_text())["train"]
        assert train["tokens"] == s.tokens == s.tokens_per_epoch
        assert len({c.tokens // c.items for c in s.components}) == 1  # one width per stage
