"""Config: typed parsing, overrides, variants and grids, one-line errors naming the key."""

from pathlib import Path

import pytest

from factmem.config import experiment_from_dict, load_experiment, to_dict
from factmem.errors import ConfigError

CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml")
                 if "accelerate" not in p.parts)  # launcher configs: test_scale.py


def base(**extra):
    raw = {
        "name": "t",
        "sets": {"a": {"source": "kvr", "n": 4}, "b": {"source": "kvr", "n": 4, "offset": 100}},
        "stages": [{"name": "s1", "set": "a"}, {"name": "s2", "set": "b"}],
    }
    raw.update(extra)
    return raw


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    exp = load_experiment(path)
    assert exp.variants


def test_defaults_and_stage_train_overrides():
    raw = base(train={"lr": 1e-4, "stop": {"rule": "until_memorized", "epochs": 7}})
    raw["stages"][1]["train"] = {"lr": 3e-5}
    cfg = experiment_from_dict(raw).base
    assert cfg.stages[0].train.lr == 1e-4 and cfg.stages[1].train.lr == 3e-5
    assert cfg.stages[1].train.stop.rule == "until_memorized"  # inherited from the top level
    assert cfg.track == ["a", "b"]
    assert cfg.train.betas == (0.9, 0.95) and cfg.seeds == [0]


def test_variants_override_dotted_keys_and_stages_by_name():
    raw = base(variants={
        "naive": {},
        "remix": {"stages.s1.mix": [{"source": "random-words", "ratio": 2, "length": 8}],
                  "train.lr": 1e-3},
    })
    exp = experiment_from_dict(raw)
    assert list(exp.variants) == ["naive", "remix"]
    remix = exp.variants["remix"]
    assert remix.stages[0].mix[0].ratio == 2 and remix.stages[0].mix[0].params.length == 8
    assert all(s.train.lr == 1e-3 for s in remix.stages)
    assert exp.variants["naive"].stages[0].mix == []


def test_grid_expands_into_named_variants():
    exp = experiment_from_dict(base(variants={"sweep": {"grid": {"train.lr": [1e-5, 5e-5]}}}))
    assert list(exp.variants) == ["sweep[lr=1e-05]", "sweep[lr=5e-05]"]
    assert exp.variants["sweep[lr=5e-05]"].stages[1].train.lr == 5e-5


def test_cli_overrides_are_yaml_values():
    exp = experiment_from_dict(base(), ["train.batch_size=4", "seeds=[0, 1]", "stages.0.set=b"])
    assert exp.base.train.batch_size == 4 and exp.base.seeds == [0, 1]
    assert exp.base.stages[0].set == "b"


def test_resolved_config_round_trips():
    raw = base(variants={"remix": {"stages.s1.mix": [{"source": "random-words", "ratio": 1}]}})
    cfg = experiment_from_dict(raw).variants["remix"]
    again = experiment_from_dict({**to_dict(cfg), "variants": {}}).base
    assert to_dict(again) == {**to_dict(cfg), "variants": {}}


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r.update(trian={}), r"trian: unknown key; did you mean 'train'"),
    (lambda r: r.update(train={"lr": "fast"}), r"train.lr: expected a number, got 'fast'"),
    (lambda r: r.update(train={"lr": -1}), r"train.lr.*must be > 0"),
    (lambda r: r.update(train={"batch_size": 0}), r"train.batch_size: must be >= 1, got 0"),
    (lambda r: r.update(train={"stop": {"rule": "forever"}}), r"train.stop.rule: 'forever' is not one of"),
    (lambda r: r["stages"][1].update(mix=[{"source": "random-words", "ratio": -1}]),
     r"stages.1.mix.0.ratio: must be >= 0, got -1"),
    (lambda r: r["stages"][1].update(mix=[{"source": "random-words"}]),
     r"stages.1.mix.0: give exactly one of `ratio` or `count`"),
    (lambda r: r["stages"][1].update(replay=[{"stage": "s2", "ratio": 1}]),
     r"stages.1.replay.0.stage: no earlier stage named 's2'"),
    (lambda r: r["stages"][0].update(set="c"), r"stages.0.set: no set named 'c'"),
    (lambda r: r["sets"].update(c={"source": "kvx", "n": 1}), r"sets.c.source: unknown source 'kvx'.*'kvr'"),
    (lambda r: r["sets"]["a"].update(n=0), r"sets.a.n: must be >= 1, got 0 \(an empty set"),
    (lambda r: r.update(track=["zz"]), r"track.0: no set named 'zz'"),
    (lambda r: r.update(variants={"v": {"train.lr": 0}}), r"variants.v: .*lr: must be > 0"),
])
def test_bad_configs_give_one_line_naming_the_key(mutate, message):
    raw = base()
    mutate(raw)
    with pytest.raises(ConfigError, match=message) as e:
        experiment_from_dict(raw, source="exp.yaml")
    assert "\n" not in str(e.value) and str(e.value).startswith("exp.yaml: ")


def test_malformed_yaml_names_line_and_column(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\nsets: {a: [1,\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:3:1: malformed YAML"):
        load_experiment(p)
    with pytest.raises(ConfigError, match="no such config file"):
        load_experiment(tmp_path / "missing.yaml")


def test_yaml_reads_on_off_yes_no_as_words_not_booleans(tmp_path):
    """YAML 1.1 turns `on:` into the key True; factmem reads YAML 1.2 booleans (true/false)."""
    import pytest

    from factmem.config import load_experiment
    from factmem.errors import ConfigError

    path = tmp_path / "x.yaml"
    path.write_text("sets: {a: {source: kvr, n: 4}, b: {source: kvr, n: 4, offset: 9}}\n"
                    "stages:\n  - {name: s1, set: a}\n"
                    "  - {name: s2, set: b, mix: [{source: random-words, ratio: 1}],\n"
                    "     regularizers: [{kind: kl, on: mix}]}\n")
    stage = load_experiment(path).base.stages[1]
    assert stage.regularizers[0].on == "mix"
    path.write_text(path.read_text() + "train: {packing: yes}\n")
    with pytest.raises(ConfigError, match="train.packing: expected true/false, got 'yes'"):
        load_experiment(path)
