"""Loading: every shipped config validates; stages inherit the top-level train settings."""

from pathlib import Path

import pytest

from factmem.config import experiment_from_dict, load_experiment

CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[2] / "configs").rglob("*.yaml")
                 if "accelerate" not in p.parts)  # launcher configs: test_scale.py


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    exp = load_experiment(path)
    assert exp.variants


def test_defaults_and_stage_train_overrides(base):
    raw = base(train={"lr": 1e-4, "stop": {"rule": "until_memorized", "epochs": 7}})
    raw["stages"][1]["train"] = {"lr": 3e-5}
    cfg = experiment_from_dict(raw).first_variant
    assert cfg.stages[0].train.lr == 1e-4 and cfg.stages[1].train.lr == 3e-5
    assert cfg.stages[1].train.stop.rule == "until_memorized"  # inherited from the top level
    assert cfg.track == ["a", "b"]
    assert cfg.train.betas == (0.9, 0.95) and cfg.seeds == [0]
