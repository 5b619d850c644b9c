"""`--set` overrides and variant keys merge into the config key by key: a mapping given for a
section changes the keys it names and keeps the others. Replacing a whole section is explicit:
the `!replace` tag (in a config file or a `--set` value). Malformed variants given through
`--set` are one line, exit 2."""

from __future__ import annotations

import pytest

from factmem.cli import main
from factmem.config import experiment_from_dict
from factmem.config.yaml_io import load_yaml_text
from factmem.errors import ConfigError

from .test_bad_inputs import write_config


def base(**extra) -> dict:
    return {"name": "x",
            "train": {"lr": 3e-3, "batch_size": 4, "stop": {"rule": "epochs", "epochs": 1}},
            "sets": {"a": {"source": "kvr", "n": 2}, "b": {"source": "kvr", "n": 2, "offset": 9}},
            "stages": [{"name": "s1", "set": "a"}, {"name": "s2", "set": "b"}],
            "variants": {"v": {}}, **extra}


def train_of(exp, variant: str = "v", stage: int = 0):
    t = exp.variants[variant].stages[stage].train
    return t.lr, t.batch_size, t.stop.epochs


def test_a_dotted_override_into_a_variants_train_changes_only_that_key():
    exp = experiment_from_dict(base(), ["variants.v.train.lr=1e-4"])
    assert train_of(exp) == (1e-4, 4, 1)  # before: batch 32 and 20 epochs (the defaults)


def test_a_variant_key_holding_a_mapping_merges_into_the_section():
    exp = experiment_from_dict(base(variants={"v": {"train": {"lr": 1e-4}}}))
    assert train_of(exp) == (1e-4, 4, 1)
    exp = experiment_from_dict(base(variants={"v": {"train": {"stop": {"epochs": 3}}}}))
    assert train_of(exp) == (3e-3, 4, 3)
    assert exp.variants["v"].stages[0].train.stop.rule == "epochs"


def test_a_set_mapping_merges_at_every_level():
    exp = experiment_from_dict(base(), ["train={lr: 1.0e-4}"])
    assert train_of(exp) == (1e-4, 4, 1)
    exp = experiment_from_dict(base(), ["stages.s2={train: {lr: 1.0e-5}}"])
    assert exp.variants["v"].stages[1].set == "b"  # the stage keeps its set
    assert train_of(exp, stage=1) == (1e-5, 4, 1)
    exp = experiment_from_dict(base(), ["variants={w: {train.lr: 1.0e-4}}"])
    assert list(exp.variants) == ["v", "w"]


def test_a_set_override_wins_over_the_variants_own_dotted_key():
    exp = experiment_from_dict(base(variants={"v": {"train": {"batch_size": 2},
                                                    "train.lr": 1e-3}}),
                               ["variants.v.train.lr=1e-4"])
    assert train_of(exp) == (1e-4, 2, 1)


def test_grid_keys_merge_too():
    raw = base(variants={"v": {"grid": {"train.lr": [1e-3, 1e-4]}}})
    exp = experiment_from_dict(raw, ["variants.v.grid.train.batch_size=[2, 4]"])
    assert list(exp.variants) == ["v[lr=0.001,batch_size=2]", "v[lr=0.001,batch_size=4]",
                                  "v[lr=0.0001,batch_size=2]", "v[lr=0.0001,batch_size=4]"]
    exp = experiment_from_dict(raw, ["variants.v.grid={train.lr: [1.0e-5]}"])
    assert list(exp.variants) == ["v[lr=1e-05]"]


def test_replace_is_explicit_with_the_replace_tag():
    exp = experiment_from_dict(base(), ["train=!replace {lr: 1.0e-4}"])
    assert train_of(exp) == (1e-4, 32, 20)  # the defaults: nothing kept from the config
    raw = load_yaml_text("v: {train: !replace {lr: 1.0e-4}}")
    exp = experiment_from_dict(base(variants=raw))
    assert train_of(exp) == (1e-4, 32, 20)
    exp = experiment_from_dict(base(), ["variants.v.train=!replace {lr: 1.0e-4}"])
    assert train_of(exp) == (1e-4, 32, 20)
    # a stage's own train merges over the top-level one, unless it is replaced
    stages = load_yaml_text("[{name: s1, set: a, train: !replace {lr: 1.0e-4}}]")
    exp = experiment_from_dict(base(stages=stages, variants={}))
    assert train_of(exp, "default") == (1e-4, 32, 20)
    exp = experiment_from_dict(base(), ["variants=!replace {w: {}}"])
    assert list(exp.variants) == ["w"]


def test_an_empty_mapping_does_not_silently_change_nothing():
    with pytest.raises(ConfigError, match=r"^--set 'variants=\{\}': variants: an empty mapping "
                       r"changes nothing here \(it holds v\); to remove every variant, write "
                       r"variants=!replace \{\}$"):
        experiment_from_dict(base(), ["variants={}"])
    exp = experiment_from_dict(base(), ["variants=!replace {}"])
    assert list(exp.variants) == ["default"]


def test_the_replace_tag_survives_the_saved_config():
    from factmem.config.yaml_io import dump_yaml

    raw = base(variants=load_yaml_text("v: {train: !replace {lr: 1.0e-4}}"))
    again = load_yaml_text(dump_yaml(raw))
    assert again == raw and type(again["variants"]["v"]["train"]).__name__ == "Replace"
    assert "!replace" in dump_yaml(raw)
    assert train_of(experiment_from_dict(again)) == (1e-4, 32, 20)


MALFORMED = {
    "a number": ("variants.v=5", "variants.v: expected a mapping of overrides"),
    "a list": ("variants.v=[1, 2]", "variants.v: expected a mapping of overrides"),
    "a number as a key": ("variants.v={1: 2}", "variants.v: override keys are dotted names"),
    "an empty key": ("variants.v={'': 2}", "variants.v: override keys are dotted names"),
    "an empty key part": ("variants.v={train..lr: 2}",
                          "variants.v: train..lr: empty part in a dotted key"),
    "a grid of a number": ("variants.v.grid=3", "variants.v.grid: expected {dotted.key:"),
    "a grid with a number key": ("variants.v.grid={1: [1]}", "variants.v.grid: expected"),
    "a grid with an empty list": ("variants.v.grid={train.lr: []}", "variants.v.grid: expected"),
    "a variant key inside a value": ("variants.v.train.lr.x=1", "variants.v: train.lr: cannot "
                                     "set a key inside"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_variants_through_set_are_one_line_exit_2(case, tiny_model_dir, tmp_path,
                                                             capsys):
    override, message = MALFORMED[case]
    cfg = write_config(tiny_model_dir, tmp_path)
    assert main(["run", str(cfg), "--no-progress", "--dry-run", "--set", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("factmem: error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert not (tmp_path / "runs").exists()
