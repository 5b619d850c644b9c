"""Names that become file or folder names (the run, sets, stages, variants, grid-made variants)
are checked as one safe path component by the config checks that `--dry-run` and the run share,
before anything is written; two names that would share a folder are refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from factmem.cli import main
from factmem.config import experiment_from_dict
from factmem.errors import ConfigError

from .test_bad_inputs import write_config

MODES = {"run": [], "dry run": ["--dry-run"]}


def edit(cfg: Path, change) -> Path:
    raw = yaml.safe_load(cfg.read_text())
    change(raw)
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    return cfg


def rename_set(raw: dict, old: str, new: str) -> None:
    raw["sets"][new] = raw["sets"].pop(old)
    for st in raw["stages"]:
        if st["set"] == old:
            st["set"] = new


# (case, change to the config, text the one-line error must hold)
BAD_NAMES = {
    "set escaping upwards": (lambda r: rename_set(r, "kvr_a", "../../x"), "sets: '../../x'"),
    "absolute set name": (lambda r: rename_set(r, "kvr_a", "/tmp/factmem-x"),
                          "sets: '/tmp/factmem-x'"),
    "set with a backslash": (lambda r: rename_set(r, "kvr_a", "a\\b"), "sets: 'a\\\\b'"),
    "set named '.'": (lambda r: rename_set(r, "kvr_a", "."), "sets: '.'"),
    "hidden set name": (lambda r: rename_set(r, "kvr_a", ".x"), "sets: '.x'"),
    "set with a control character": (lambda r: rename_set(r, "kvr_a", "a\nb"), "sets: 'a\\nb'"),
    "set with a NUL": (lambda r: rename_set(r, "kvr_a", "a\0b"), "sets: 'a\\x00b'"),
    "empty set name": (lambda r: rename_set(r, "kvr_a", ""), "sets: ''"),
    "stage named '..'": (lambda r: r["stages"][0].update(name=".."), "stages.0.name: '..'"),
    "stage with a slash": (lambda r: r["stages"][1].update(name="a/b"), "stages.1.name: 'a/b'"),
    "variant named '..'": (lambda r: r.update(variants={"..": {}}), "variants: '..'"),
    "variant with a slash": (lambda r: r.update(variants={"x/y": {}}), "variants: 'x/y'"),
    "variant name too long": (lambda r: r.update(variants={"v" * 101: {}}), "101 characters"),
    "grid base name escaping": (
        lambda r: r.update(variants={"../v": {"grid": {"train.lr": [1e-3]}}}), "variants: '../v'"),
    "run name '..'": (lambda r: r.update(name=".."), "name: '..'"),
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("case", list(BAD_NAMES))
def test_a_name_that_is_not_one_safe_path_component_is_refused_before_anything_is_written(
        case, mode, tiny_model_dir, tmp_path, capsys):
    change, message = BAD_NAMES[case]
    cfg = edit(write_config(tiny_model_dir, tmp_path), change)
    before = set(os.listdir(tmp_path))
    assert main(["run", str(cfg), "--no-progress", *MODES[mode]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("factmem: error: ") and err.count("\n") == 1, err
    assert message in err and "letters, digits" in err, err
    assert set(os.listdir(tmp_path)) == before  # nothing written, here or above
    assert not Path("/tmp/factmem-x.jsonl").exists()  # today's code wrote it there


# two names that would share a folder or a file
COLLISIONS = {
    "variants differing in case": (
        lambda r: r.update(variants={"naive": {}, "Naive": {"train.lr": 1e-3}}),
        "variants: 'naive' and 'Naive' differ only in case"),
    "sets differing in case": (
        lambda r: r["sets"].update(KVR_A=dict(r["sets"]["kvr_a"])),
        "sets: 'kvr_a' and 'KVR_A' differ only in case"),
    "a grid making the same name twice": (
        lambda r: r.update(variants={"v": {"grid": {"train.lr": [0.001, 1.0e-3]}}}),
        "variants.v.grid: two combinations make the same variant 'v[lr=0.001]'"),
    "grid names sharing a folder": (
        lambda r: r.update(variants={"v": {"grid": {"model.system_prompt": ["a b", "a_b"]}}}),
        "variants: 'v[system_prompt=a b]' and 'v[system_prompt=a_b]' would share the folder "
        "'v[system_prompt=a_b]'"),
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("case", list(COLLISIONS))
def test_names_that_would_share_a_folder_are_refused(case, mode, tiny_model_dir, tmp_path,
                                                     capsys):
    change, message = COLLISIONS[case]
    cfg = edit(write_config(tiny_model_dir, tmp_path), change)
    assert main(["run", str(cfg), "--no-progress", *MODES[mode]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("factmem: error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert not (tmp_path / "runs").exists()


def base(**extra) -> dict:
    return {"name": "x", "sets": {"a": {"source": "kvr", "n": 2}},
            "stages": [{"name": "s1", "set": "a"}], **extra}


@pytest.mark.parametrize("name", ["kvr_a", "stage-2", "v1.5", "lr=1e-4,bs=8", "A+B", "_x",
                                  "x" * 100])
def test_plain_names_pass(name):
    exp = experiment_from_dict(base(name=name, sets={name: {"source": "kvr", "n": 2}},
                                    stages=[{"name": name, "set": name}],
                                    variants={name: {}}))
    assert list(exp.variants) == [name]


def test_grid_made_names_stay_one_folder_each():
    """A grid over text values makes names with any characters; their folders are single safe
    components (characters outside the pattern become '_'), distinct from each other."""
    from factmem.rundir import safe_name

    exp = experiment_from_dict(base(variants={"v": {"grid": {
        "model.system_prompt": ["../../etc", "a\0b", "Tab\there"]}}}))
    folders = [safe_name(v) for v in exp.variants]
    assert folders == ["v[system_prompt=.._.._etc]", "v[system_prompt=a_b]",
                       "v[system_prompt=Tab_here]"]


def test_the_allowed_pattern_is_one_documented_rule():
    with pytest.raises(ConfigError, match=r"stages\.0\.name: 'a b' is not a plain name"):
        experiment_from_dict(base(stages=[{"name": "a b", "set": "a"}]))
