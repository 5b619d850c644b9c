"""The results table: mean and spread over seeds."""

import statistics

import pytest

from factmem.config import experiment_from_dict
from factmem.results import summary_table, to_markdown


def record(acc_s1: float) -> dict:
    return {"stages": ["base", "s1"], "sets": ["a"],
            "accuracy": {"base": {"a": 0.0}, "s1": {"a": acc_s1}}, "forgetting": {}}


def test_spread_over_seeds_is_the_sample_standard_deviation():
    exp = experiment_from_dict({"name": "t", "sets": {"a": {"source": "kvr", "n": 4}},
                                "stages": [{"name": "s1", "set": "a"}], "seeds": [0, 1, 2]})
    summary = summary_table(exp, {"v": {0: record(0.0), 1: record(0.5), 2: record(1.0)}})
    cell = summary["table"]["v"]["a"]["s1"]
    # n - 1 in the denominator: 0.5, where the population std would print 0.41
    assert cell["std"] == pytest.approx(statistics.stdev([0.0, 0.5, 1.0])) == pytest.approx(0.5)
    md = to_markdown(summary)
    assert "| v | 0.0 ± 0.0 | 50.0 ± 50.0 |" in md
    assert "sample standard deviation over the 3 seeds" in md
