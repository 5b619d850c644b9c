"""Baseline options in the config (regularizers, lora, freeze, joint): validation, round trips
through the config and the run directory, and joint training seeing every item."""

import json

import pytest
import torch
from accelerate import Accelerator

from factmem.config import ModelConfig, StopConfig, TrainConfig, experiment_from_dict, to_dict
from factmem.errors import ConfigError
from factmem.experiment import run_experiment
from factmem.mixing import build_mixture
from factmem.models import Formatter, load_model, load_tokenizer
from factmem.sets import SetCache
from factmem.train import StageCallback, train_stage

SETS = {"a": {"source": "kvr", "n": 4, "key_length": 4, "value_length": 2},
        "b": {"source": "kvr", "n": 4, "offset": 100, "key_length": 4, "value_length": 2}}

EVERYTHING = {  # every baseline option in one stage
    "regularizers": [{"kind": "ewc", "weight": 0.5, "normalize": True},
                     {"kind": "l2", "weight": 0.1},
                     {"kind": "kl", "weight": 2.0, "temperature": 3.0, "on": "mix"}],
    "mix": [{"source": "random-words", "ratio": 1, "length": 4}],
    "lora": {"rank": 2, "alpha": 4, "dropout": 0.1, "target_modules": ["q_proj"], "merge": True},
    "freeze": {"embeddings": True, "layers": [0]},
}


def raw(**extra):
    cfg = {"name": "t", "sets": SETS,
           "stages": [{"name": "s1", "set": "a"}, {"name": "s2", "set": "b", **EVERYTHING}]}
    cfg.update(extra)
    return cfg


def test_every_option_parses_and_round_trips_through_the_config():
    cfg = experiment_from_dict(raw()).first_variant
    s2 = cfg.stages[1]
    assert [r.kind for r in s2.regularizers] == ["ewc", "l2", "kl"]
    assert s2.regularizers[2].temperature == 3.0 and s2.regularizers[2].on == "mix"
    assert s2.lora.rank == 2 and s2.lora.target_modules == ["q_proj"] and s2.lora.dropout == 0.1
    assert s2.freeze.embeddings and s2.freeze.layers == [0]
    assert cfg.stages[0].regularizers == [] and cfg.stages[0].lora is None
    again = experiment_from_dict({**to_dict(cfg), "variants": {}}).first_variant
    assert to_dict(again) == {**to_dict(cfg), "variants": {}}


def test_joint_stage_config_tracks_every_set_and_round_trips():
    cfg = experiment_from_dict(
        raw(stages=[{"name": "j", "set": "b", "joint": ["a"]}])).first_variant
    assert cfg.stages[0].joint == ["a"] and cfg.track == ["b", "a"]
    again = experiment_from_dict({**to_dict(cfg), "variants": {}}).first_variant
    assert to_dict(again) == {**to_dict(cfg), "variants": {}}


@pytest.mark.parametrize("stages, message", [
    ([{"name": "s1", "set": "a", "regularizers": [{"kind": "ewc"}]}],
     r"stages.0.regularizers.0: ewc needs an earlier stage"),
    ([{"name": "s1", "set": "a"},
      {"name": "s2", "set": "b", "regularizers": [{"kind": "kl", "on": "mix"}]}],
     r"stages.1.regularizers.0.on: `mix` needs mix components"),
    ([{"name": "s1", "set": "a", "regularizers": [{"kind": "fisher"}]}],
     r"stages.0.regularizers.0.kind: 'fisher' is not one of"),
    ([{"name": "s1", "set": "a", "regularizers": [{"kind": "l2", "weight": -1}]}],
     r"stages.0.regularizers.0.weight: must be >= 0"),
    ([{"name": "s1", "set": "a", "regularizers": [{"kind": "kl", "temperature": 0}]}],
     r"stages.0.regularizers.0.temperature: must be > 0"),
    ([{"name": "s1", "set": "a", "lora": {"rank": 0}}], r"stages.0.lora.rank: must be >= 1"),
    ([{"name": "s1", "set": "a", "lora": {"rnak": 4}}],
     r"stages.0.lora.rnak: unknown key; did you mean 'rank'"),
    ([{"name": "s1", "set": "a", "freeze": {"layers": "all"}}],
     r"stages.0.freeze.layers: expected a list"),
    ([{"name": "s1", "set": "a", "joint": ["c"]}], r"stages.0.joint.0: no set named 'c'"),
    ([{"name": "s1", "set": "a", "lora": {"rank": 4, "merge": False}},
      {"name": "s2", "set": "b", "lora": {"rank": 8}}],
     r"stages.1.lora: stage 's1' keeps its adapter .* same lora settings"),
])
def test_bad_baseline_options_give_one_line_naming_the_key(stages, message):
    with pytest.raises(ConfigError, match=message) as e:
        experiment_from_dict(raw(stages=stages))
    assert "\n" not in str(e.value)


def test_joint_training_sees_every_item(tiny_model_dir):
    cfg = experiment_from_dict(
        raw(stages=[{"name": "j", "set": "b", "joint": ["a"]}])).first_variant
    sets = SetCache().sets(cfg)
    mixture = build_mixture(cfg, 0, sets, run_seed=0)
    assert [c.role for c in mixture.components] == ["main", "joint"]

    class Seen(StageCallback):
        def __init__(self):
            self.ids: list[str] = []

        def extra_loss(self, ctx, items, share):
            self.ids += [e.id for e in items]

    mcfg = ModelConfig(name=str(tiny_model_dir))
    torch.manual_seed(0)
    model, fmt = load_model(mcfg), Formatter(load_tokenizer(mcfg))
    acc = Accelerator(cpu=True)
    seen = Seen()
    tcfg = TrainConfig(batch_size=3, stop=StopConfig(rule="epochs", epochs=1))
    train_stage(acc.prepare(model), acc, fmt, mixture.examples(), tcfg, seed=0, progress=False,
                callbacks=[seen])
    every = [e.id for s in ("a", "b") for e in sets[s]]
    assert sorted(seen.ids) == sorted(every) and len(every) == 8  # each item once per epoch


@pytest.mark.slow
def test_options_round_trip_through_the_run_directory(tiny_model_dir, tmp_path):
    cfg = raw(model={"name": str(tiny_model_dir)},
              train={"lr": 1e-3, "batch_size": 4, "stop": {"rule": "epochs", "epochs": 1}},
              variants={"all": {},
                        "joint": {"stages": [{"name": "s2", "set": "b", "joint": ["a"]}]}},
              output={"dir": str(tmp_path)})
    exp = experiment_from_dict(cfg)
    run_experiment(exp, progress=False)
    root = tmp_path / "t"
    resolved = json.loads((root / "resolved.json").read_text())
    for name, variant in exp.variants.items():
        again = experiment_from_dict({**resolved[name], "variants": {}}).first_variant
        assert to_dict(again) == {**to_dict(variant), "variants": {}}
    stage2 = root / "all" / "seed0" / "02-s2"
    metrics = json.loads((stage2 / "metrics.json").read_text())
    regs = metrics["regularizers"]
    assert [r["kind"] for r in regs] == ["ewc", "l2", "kl"]
    assert all(r["extra_bytes"] > 0 for r in regs)
    assert regs[0]["fisher_file"] == "fisher.safetensors"
    assert (stage2 / "fisher.safetensors").is_file()
    params = metrics["parameters"]
    assert 0 < params["trainable_parameters"] < params["total_parameters"]
    row = json.loads((stage2 / "train_log.jsonl").read_text().splitlines()[0])
    assert {"ewc_penalty", "l2_penalty", "kl"} <= set(row)
    # joint: one stage on both sets; both count as trained by it
    acc = json.loads((root / "joint" / "seed0" / "accuracy.json").read_text())
    assert acc["stages"] == ["base", "s2"] and set(acc["forgetting"]) == {"a", "b"}
    manifest = json.loads((root / "joint" / "seed0" / "01-s2" / "manifest.json").read_text())
    assert manifest["total"] == 8
