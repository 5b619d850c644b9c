"""Which existing run directories may be continued: same config only, named differences."""

import json

import pytest
import yaml

from factmem.errors import FactmemError
from factmem.rundir import check_resumable, diff_keys


def test_diff_keys_names_dotted_paths():
    old = {"train": {"lr": 1e-3, "stop": {"epochs": 2}}, "seeds": [0], "stages": [{"name": "a"}]}
    new = {"train": {"lr": 1e-3, "stop": {"epochs": 3}}, "seeds": [0, 1], "stages": [{"name": "b"}],
           "eval": {"mode": "fast"}}
    assert diff_keys(old, new) == ["train.stop.epochs", "seeds", "stages.0.name", "eval"]
    assert diff_keys(old, json.loads(json.dumps(old))) == []


def make_run(tmp_path, raw, resolved):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "resolved.json").write_text(json.dumps(resolved))
    return tmp_path


def test_same_config_continues_and_operational_keys_may_change(tmp_path):
    raw = {"name": "x", "train": {"lr": 1e-3}, "output": {"checkpoint_every": 5}}
    resolved = {"default": {"train": {"lr": 1e-3}, "output": {"checkpoint_every": 5}}}
    root = make_run(tmp_path, raw, resolved)
    check_resumable(root, raw, resolved)
    check_resumable(root, {**raw, "output": {"checkpoint_every": 9}},
                    {"default": {"train": {"lr": 1e-3}, "output": {"checkpoint_every": 9}}})
    tracked = {"checkpoint_every": 5, "report_to": ["tensorboard"]}  # tracking added later
    check_resumable(root, {**raw, "output": tracked},
                    {"default": {"train": {"lr": 1e-3}, "output": tracked}})


def test_a_changed_resolved_setting_is_named_with_its_variant(tmp_path):
    raw = {"name": "x"}
    root = make_run(tmp_path, raw, {"naive": {"train": {"lr": 1e-3}}})
    with pytest.raises(FactmemError, match=r"changed: naive\.train\.lr\)"):
        check_resumable(root, raw, {"naive": {"train": {"lr": 2e-3}}})


def test_a_directory_that_is_not_a_run_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FactmemError, match="exists and is not a factmem run"):
        check_resumable(tmp_path, {}, {})


def test_a_setting_added_since_the_run_left_at_null_is_not_a_change(tmp_path):
    """A run written before `model.architecture` existed resumes (its resolved config lacks
    the key); the same key with a value, or a null key the run did have, is a change."""
    raw = {"name": "x"}
    root = make_run(tmp_path, raw, {"naive": {"model": {"name": "m", "dtype": "auto"}}})
    check_resumable(root, raw, {"naive": {"model": {"name": "m", "dtype": "auto",
                                                    "architecture": None}}})
    with pytest.raises(FactmemError, match=r"changed: naive\.model\.architecture\)"):
        check_resumable(root, raw, {"naive": {"model": {"name": "m", "dtype": "auto",
                                                        "architecture": "c.json"}}})
    with pytest.raises(FactmemError, match=r"changed: naive\.model\.dtype\)"):
        check_resumable(root, raw, {"naive": {"model": {"name": "m", "dtype": None}}})
