"""Shared by the config tests: a small raw experiment, and the check that loading it is refused
with one line that starts with the file and names the key."""

import pytest

from factmem.config import experiment_from_dict
from factmem.errors import ConfigError


@pytest.fixture
def base():
    """base(**extra): two sets, two stages; keyword arguments add or replace top-level keys."""

    def make(**extra):
        raw = {
            "name": "t",
            "sets": {"a": {"source": "kvr", "n": 4},
                     "b": {"source": "kvr", "n": 4, "offset": 100}},
            "stages": [{"name": "s1", "set": "a"}, {"name": "s2", "set": "b"}],
        }
        raw.update(extra)
        return raw

    return make


@pytest.fixture
def refused():
    """refused(raw, message): loading `raw` fails with one line matching `message`."""

    def check(raw, message):
        with pytest.raises(ConfigError, match=message) as e:
            experiment_from_dict(raw, source="exp.yaml")
        assert "\n" not in str(e.value) and str(e.value).startswith("exp.yaml: ")

    return check
