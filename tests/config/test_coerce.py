"""Coercion: types, unknown keys with the nearest valid one, a source's own parameters written
flat, and the way back (to_dict)."""

import pytest

from factmem.config import SetConfig, _parse_with_source_params, experiment_from_dict, to_dict
from factmem.data import build_source
from factmem.data.synthetic import RandomWordsParams
from factmem.errors import ConfigError


def test_resolved_config_round_trips(base):
    raw = base(variants={"remix": {"stages.s1.mix": [{"source": "random-words", "ratio": 1}]}})
    cfg = experiment_from_dict(raw).variants["remix"]
    again = experiment_from_dict({**to_dict(cfg), "variants": {}}).first_variant
    assert to_dict(again) == {**to_dict(cfg), "variants": {}}


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r.update(trian={}), r"trian: unknown key; did you mean 'train'"),
    (lambda r: r.update(train={"lr": "fast"}), r"train.lr: expected a number, got 'fast'"),
    (lambda r: r.update(train={"lr": -1}), r"train.lr.*must be > 0"),
    (lambda r: r.update(train={"batch_size": 0}), r"train.batch_size: must be >= 1, got 0"),
    (lambda r: r.update(train={"stop": {"rule": "forever"}}),
     r"train.stop.rule: 'forever' is not one of"),
    (lambda r: r["sets"].update(c={"source": "kvx", "n": 1}),
     r"sets.c.source: unknown source 'kvx'.*'kvr'"),
])
def test_bad_configs_give_one_line_naming_the_key(mutate, message, base, refused):
    raw = base()
    mutate(raw)
    refused(raw, message)


def test_set_config_parses_flat_source_params_and_rejects_unknown_ones():
    cfg = _parse_with_source_params(SetConfig, {"source": "random-words", "n": 4, "length": 8},
                                    "sets.rw", ("source", "n", "offset", "seed"))
    assert cfg.params == RandomWordsParams(length=8)
    with pytest.raises(ValueError, match="sets.rw.lenght: unknown key; did you mean 'length'"):
        _parse_with_source_params(SetConfig, {"source": "random-words", "lenght": 8},
                                  "sets.rw", ("source", "n", "offset", "seed"))
    with pytest.raises(ConfigError, match="unknown source 'kvrr'.*did you mean 'kvr'"):
        build_source("kvrr", None, 1, 0, 0)
