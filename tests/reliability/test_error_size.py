"""An error quotes at most ~200 characters of a value and is never longer than about a kilobyte;
YAML aliases are bounded. Before, a 1 KB alias bomb made a multi-megabyte (at depth, multi-GB)
error line and a 100,000-item list a 300 KB one."""

import json
import re
import time

import pytest

from factmem.cli import main
from factmem.config import load_experiment
from factmem.errors import ConfigError, DataError

from .test_bad_inputs import write_config


def alias_bomb(levels: int = 7) -> str:
    """`a: &a [1 x 9]`, `b: &b [*a x 9]`, ...: 9**levels values from a few hundred bytes."""
    lines = ["l0: &l0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    for k in range(1, levels):
        lines.append(f"l{k}: &l{k} [" + ", ".join([f"*l{k - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def run_cli(tmp_path, cfg, capsys, *args: str) -> str:
    assert main(["run", str(cfg), "--no-progress", "--dry-run", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("factmem: error: ") and err.count("\n") == 1, err[:300]
    return err


def test_an_alias_bomb_is_refused_at_once_naming_file_and_line(tiny_model_dir, tmp_path, capsys):
    cfg = write_config(tiny_model_dir, tmp_path)
    text = cfg.read_text().replace("batch_size: 4", "batch_size: *l6")
    cfg.write_text(alias_bomb() + text)
    assert len(alias_bomb()) < 400
    start = time.perf_counter()
    err = run_cli(tmp_path, cfg, capsys)
    assert time.perf_counter() - start < 10
    assert err.startswith(f"factmem: error: {cfg}:6: aliases expand to more than 100,000 values"
                          " (at alias *l4); write the values out"), err[:300]


def test_ordinary_aliases_still_load(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("name: a\nsets: {k: &k {source: kvr, n: 2}, k2: *k}\n"
                    "stages: [{name: s1, set: k}, {name: s2, set: k2}]\n")
    exp = load_experiment(str(path))
    assert exp.first_variant.sets["k2"].n == 2


@pytest.mark.parametrize("yaml_text,message", [
    ("name: &a [*a]\n", "exp.yaml:1: alias *a refers to a value that contains it"),
    ("name: " + "[" * 5000 + "]" * 5000 + "\n", "exp.yaml: values nested too deeply"),
])
def test_recursive_and_deeply_nested_yaml_is_one_line(tmp_path, yaml_text, message):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_experiment(str(path))


def test_a_huge_value_is_quoted_in_at_most_200_characters(tiny_model_dir, tmp_path, capsys):
    cfg = write_config(tiny_model_dir, tmp_path)
    cfg.write_text(cfg.read_text().replace("batch_size: 4", "batch_size: ["
                                           + ", ".join(["0"] * 100_000) + "]"))
    err = run_cli(tmp_path, cfg, capsys)
    assert err.endswith("train.batch_size: expected an integer, got [0, 0, 0, 0, 0, 0, 0, 0, "
                        "...]\n"), err[:300]
    cfg = write_config(tiny_model_dir, tmp_path)
    err = run_cli(tmp_path, cfg, capsys, "--set", "name=[" + "x" * 100_000 + "]")
    assert len(err) < len(str(cfg)) + 300, err[:300]
    assert "'xxx" in err and "...[" in err  # cut inside the quoted value, and says so


def test_every_error_message_is_bounded_keeping_its_start_and_end():
    from factmem.errors import MESSAGE_LIMIT, QUOTE_LIMIT, quote

    e = DataError("qa.jsonl:2: field 'answer': " + "y" * 1_000_000 + " (the hint at the end)")
    msg = str(e)
    assert len(msg) <= MESSAGE_LIMIT + 50
    assert msg.startswith("qa.jsonl:2: field 'answer': yyy")
    assert msg.endswith("yyy (the hint at the end)") and "characters cut]" in msg
    assert len(quote(list(range(100_000)))) <= QUOTE_LIMIT
    assert len(quote("z" * 100_000)) <= QUOTE_LIMIT + 40
    assert quote({"a": [1, 2]}) == "{'a': [1, 2]}"  # short values read as repr does


def test_a_data_row_with_a_huge_value_gives_a_short_error(tmp_path):
    from factmem.data import build_source
    from factmem.data.local import JsonlParams

    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": [{"k": i} for i in range(100_000)]}))
    with pytest.raises(DataError) as info:
        build_source("jsonl", JsonlParams(path=str(path)), None, 0, 0)
    assert len(str(info.value)) < len(str(path)) + 200, str(info.value)[:300]
