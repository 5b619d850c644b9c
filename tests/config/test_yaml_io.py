"""YAML reading: malformed files name line and column; YAML 1.2 booleans."""

import pytest

from factmem.config import load_experiment
from factmem.errors import ConfigError


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
    stage = load_experiment(path).first_variant.stages[1]
    assert stage.regularizers[0].on == "mix"
    path.write_text(path.read_text() + "train: {packing: yes}\n")
    with pytest.raises(ConfigError, match="train.packing: expected true/false, got 'yes'"):
        load_experiment(path)
