"""Variants against their baseline: paired differences, bootstrap intervals, the premise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from factmem import files
from factmem.compare import bootstrap, comparison, to_markdown
from factmem.config import experiment_from_dict
from factmem.rundir import RunPaths, stage_path


def test_bootstrap_interval_is_paired_and_reproducible():
    same = bootstrap([[0.5] * 10, [0.5] * 10, [0.5] * 10])
    assert same["mean"] == same["low"] == same["high"] == 0.5 and same["se"] == 0.0
    assert same["mde"] is None  # no variation: no power figure
    noisy = [[1, 0, 1, 1, 0, 1, 0, 1], [0, 0, 1, 0, 1, 0, 0, 0], [1, 1, 1, 0, 1, 1, 0, 1]]
    a, b = bootstrap(noisy), bootstrap(noisy)
    assert a == b  # seeded
    assert a["low"] < a["mean"] < a["high"] and a["mde"] == pytest.approx(2.8 * a["se"])
    # seed-to-seed spread widens the interval beyond the facts' spread alone
    flat = bootstrap([sum(noisy, [])])
    assert a["high"] - a["low"] > flat["high"] - flat["low"]


RAW = {"name": "c", "sets": {"a": {"source": "kvr", "n": 4}, "b": {"source": "kvr", "n": 4,
                                                                    "offset": 9}},
       "stages": [{"name": "s1", "set": "a"}, {"name": "s2", "set": "b"}],
       "baseline": "naive", "seeds": [0, 1],
       "variants": {"naive": {}, "remix": {"stages.s2.mix": [{"source": "generic", "ratio": 1}]},
                    "broken": {}}}


def write_predictions(root: Path, exp, variant: str, seed: int, stage: int, name: str,
                      correct: list[bool]) -> None:
    cfg = exp.variants[variant]
    out = RunPaths(root).seed_dir(variant, seed)
    rows = [{"id": f"kvr:{i}", "correct": c, "token_acc": 0.9 if c else 0.4,
             "logprob": -0.1 if c else -2.0, "rouge_l": None} for i, c in enumerate(correct)]
    files.write_jsonl(stage_path(out, cfg, stage) / "predictions" / f"{name}.jsonl", rows)


def test_comparison_pairs_facts_and_refuses_unmemorized_runs(tmp_path):
    exp = experiment_from_dict(RAW)
    for v in exp.variants:
        for seed in (0, 1):
            write_predictions(tmp_path, exp, v, seed, 0, "a", [True] * 4)  # stage 1 memorized
            write_predictions(tmp_path, exp, v, seed, 1, "b",
                              [True] * 4 if v != "broken" or seed else [True, False, True, True])
    for seed in (0, 1):  # after stage 2: naive kept 1 fact, remix 3 (the same plus two)
        write_predictions(tmp_path, exp, "naive", seed, 1, "a", [True, False, False, False])
        write_predictions(tmp_path, exp, "remix", seed, 1, "a", [True, True, True, False])
        write_predictions(tmp_path, exp, "broken", seed, 1, "a", [True] * 4)
    comp = comparison(tmp_path, exp)
    rows = {r["variant"]: r for r in comp["rows"]}
    assert set(rows) == {"naive", "remix", "broken"} and all(r["set"] == "a" for r in rows.values())
    remix = rows["remix"]
    assert remix["correct"]["mean"] == pytest.approx(0.75)
    assert remix["diff_correct"]["mean"] == pytest.approx(0.5)  # +2 of 4 facts in both seeds
    assert remix["diff_token_acc"]["mean"] == pytest.approx(0.25)
    assert "diff_correct" not in rows["naive"]  # no difference with itself
    # stage 2 of seed 0 left the set it trains at 75%: reported, not compared
    assert rows["broken"]["not_memorized"] == {"0": ["s2: b 75.0%"]}
    assert "diff_correct" not in rows["broken"]
    md = to_markdown(comp)
    assert "| remix | naive | a | 75.0 ± 0.0 | +50.0 [" in md
    # per fact the difference is 0, +1, +1, 0: the interval comes from the facts
    assert 0 < remix["diff_correct"]["low"] < 0.5 < remix["diff_correct"]["high"] < 1
    assert "not compared: not memorized (seed 0: s2: b 75.0%)" in md
    # a baseline that did not memorize cannot be compared with either
    exp2 = experiment_from_dict({**RAW, "baseline": "broken"})
    rows2 = {r["variant"]: r for r in comparison(tmp_path, exp2)["rows"]}
    assert rows2["remix"]["not_memorized"] == {"0": ["baseline s2: b 75.0%"]}
    assert "diff_correct" not in rows2["remix"]


def test_an_unknown_baseline_is_refused():
    from factmem.errors import ConfigError

    with pytest.raises(ConfigError, match="baseline: no variant named 'naiv'"):
        experiment_from_dict({**RAW, "baseline": "naiv"})


def test_run_prints_and_writes_the_comparison(tiny_model_dir, tmp_path, capsys):
    from factmem.cli import main

    kv = {"source": "kvr", "n": 4, "key_length": 4, "value_length": 2}
    cfg = {"name": "c", "model": {"name": str(tiny_model_dir)},
           "train": {"lr": 3e-3, "batch_size": 4, "stop": {"rule": "epochs", "epochs": 1}},
           "sets": {"a": kv, "b": {**kv, "offset": 50}},
           "stages": [{"name": "s1", "set": "a"}, {"name": "s2", "set": "b"}],
           "baseline": "naive", "variants": {"naive": {}, "replay": {
               "stages.s2.replay": [{"stage": "s1", "ratio": 0.5}]}},
           "output": {"dir": str(tmp_path / "runs")}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| variant | vs | set | exact match % |" in out and "| replay | naive | a |" in out
    saved = json.loads((tmp_path / "runs/c/comparison.json").read_text())
    assert [r["variant"] for r in saved["rows"]] == ["naive", "replay"]
    assert (tmp_path / "runs/c/comparison.md").is_file()
