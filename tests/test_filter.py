"""Yet-to-learn filtering and max_tokens."""

import json
from pathlib import Path

import pytest

from factmem.cli import main
from factmem.config import experiment_from_dict
from factmem.sets import SetCache

FACTS = Path(__file__).parent / "fixtures" / "filter_facts.jsonl"


def filter_args(model, tmp_path, *extra):
    return ["data", "filter", "jsonl", "--model", str(model), "--shots", "3", "--n", "12",
            "--param", f"path={FACTS}", "--cache-dir", str(tmp_path / "cache"), *extra]


def test_filter_cli_counts_cache_and_shots_outside_selection(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "unknown.jsonl"
    assert main(filter_args(tiny_model_dir, tmp_path, "--out", str(out))) == 0
    first = capsys.readouterr().out
    assert "known" in first and "of 12" in first and "cached" not in first
    (cache,) = (tmp_path / "cache").glob("*.json")
    saved = json.loads(cache.read_text())
    assert saved["counts"]["known"] + saved["counts"]["unknown"] == 12
    # shots are rows 13-15 of the file: just after the selection, never one of the judged facts
    assert saved["settings"]["shots"] == ["jsonl:13", "jsonl:14", "jsonl:15"]
    assert len(out.read_text().splitlines()) == saved["counts"]["unknown"]
    assert main(filter_args(tiny_model_dir, tmp_path)) == 0
    assert "cached" in capsys.readouterr().out
    # other settings are another cache entry
    assert main(filter_args(tiny_model_dir, tmp_path, "--match", "exact")) == 0
    assert len(list((tmp_path / "cache").glob("*.json"))) == 2


def test_filter_without_room_for_shots_is_a_one_line_error(tiny_model_dir, tmp_path, capsys):
    args = filter_args(tiny_model_dir, tmp_path)
    args[args.index("--n") + 1] = "15"
    assert main(args) == 2
    assert "few-shot" in capsys.readouterr().err


def test_set_cache_applies_max_tokens_and_filter(tiny_model_dir, tmp_path, monkeypatch):
    from factmem.config import ModelConfig
    from factmem.data import build_source
    from factmem.data.entities import EntitiesParams
    from factmem.models import Formatter, load_tokenizer

    monkeypatch.setenv("FACTMEM_CACHE", str(tmp_path / "cache"))
    fmt = Formatter(load_tokenizer(ModelConfig(name=str(tiny_model_dir))))
    lengths = sorted(len(fmt.encode(e))
                     for e in build_source("entities", EntitiesParams(), 10, 0, 0))
    limit = lengths[5]
    raw = {"model": {"name": str(tiny_model_dir)},
           "sets": {"a": {"source": "entities", "n": 10, "max_tokens": limit,
                          "filter": "unknown_to_model", "filter_shots": 2}},
           "stages": [{"name": "s1", "set": "a"}]}
    cache = SetCache()
    got = cache.sets(experiment_from_dict(raw).first_variant)["a"]
    report = cache.reports["a"]
    dropped = sum(n > limit for n in lengths)
    assert dropped > 0 and report["max_tokens"]["dropped"] == dropped
    assert report["filter"]["total"] == 10 - dropped
    assert len(got) == report["filter"]["unknown"] == report["kept"]
    assert all(len(fmt.encode(e)) <= limit for e in got)
    # verdicts go under $FACTMEM_CACHE, not always ~/.cache (they used to)
    assert report["filter"]["cache"].startswith(str(tmp_path / "cache" / "filter") + "/")
    assert len(list((tmp_path / "cache" / "filter").glob("*.json"))) == 1


@pytest.mark.slow
def test_embedded_model_knows_capitals_not_fictional_entities(tmp_path, capsys):
    """SmolLM2-135M, 3-shot: 6 capitals it knows, 6 fictional-entity facts it cannot know."""
    assert main(filter_args("smollm2-135m", tmp_path)) == 0
    print(capsys.readouterr().out)
    (cache,) = (tmp_path / "cache").glob("*.json")
    saved = json.loads(cache.read_text())
    rows = [json.loads(line) for line in FACTS.read_text().splitlines()]
    known_lines = {f"jsonl:{i + 1}" for i, r in enumerate(rows) if r.get("known") is True}
    fictional = {f"jsonl:{i + 1}" for i, r in enumerate(rows) if r.get("known") is False}
    assert fictional <= set(saved["unknown"])
    assert len(known_lines & set(saved["known"])) >= 4


def test_keep_takes_the_first_items_left_after_filtering(tiny_model_dir, tmp_path, monkeypatch):
    from factmem.config import experiment_from_dict
    from factmem.errors import DataError
    from factmem.sets import SetCache

    monkeypatch.setenv("FACTMEM_CACHE", str(tmp_path / "cache"))
    raw = {"model": {"name": str(tiny_model_dir)},
           "sets": {"a": {"source": "entities", "n": 10, "filter": "unknown_to_model",
                          "filter_shots": 2, "keep": 4}},
           "stages": [{"name": "s1", "set": "a"}]}
    cache = SetCache()
    full = SetCache().sets(experiment_from_dict({**raw, "sets": {"a": {
        **raw["sets"]["a"], "keep": None}}}).first_variant)["a"]
    got = cache.sets(experiment_from_dict(raw).first_variant)["a"]
    assert [e.id for e in got] == [e.id for e in full[:4]] and cache.reports["a"]["kept"] == 4
    raw["sets"]["a"]["keep"] = len(full) + 1
    with pytest.raises(DataError, match=f"sets.a: keep: {len(full) + 1} items asked for, "
                                        f"{len(full)} left after filtering"):
        SetCache().sets(experiment_from_dict(raw).first_variant)
