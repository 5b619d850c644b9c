"""Overrides: dotted keys (stages by name), variants, grids, `--set` values read as YAML."""

import pytest

from factmem.config import experiment_from_dict


def test_variants_override_dotted_keys_and_stages_by_name(base):
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


def test_grid_expands_into_named_variants(base):
    exp = experiment_from_dict(base(variants={"sweep": {"grid": {"train.lr": [1e-5, 5e-5]}}}))
    assert list(exp.variants) == ["sweep[lr=1e-05]", "sweep[lr=5e-05]"]
    assert exp.variants["sweep[lr=5e-05]"].stages[1].train.lr == 5e-5


def test_cli_overrides_are_yaml_values(base):
    exp = experiment_from_dict(base(), ["train.batch_size=4", "seeds=[0, 1]", "stages.0.set=b"])
    assert exp.first_variant.train.batch_size == 4 and exp.first_variant.seeds == [0, 1]
    assert exp.first_variant.stages[0].set == "b"


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r.update(variants={"v": {"train.lr": 0}}), r"variants.v: .*lr: must be > 0"),
])
def test_bad_configs_give_one_line_naming_the_key(mutate, message, base, refused):
    raw = base()
    mutate(raw)
    refused(raw, message)
