"""Retention curves: rows at step 0, every N steps and at the end, per fact, written per stage."""

import json

import pytest
import torch
from accelerate import Accelerator

from factmem.config import ModelConfig, StopConfig, TrainConfig
from factmem.data import build_source
from factmem.data.synthetic import KVRParams
from factmem.models import Formatter, load_model, load_tokenizer
from factmem.train import train_stage
from factmem.train.retention import RetentionCallback, read_retention


def test_retention_rows_every_n_steps(tiny_model_dir, tmp_path):
    cfg = ModelConfig(name=str(tiny_model_dir))
    torch.manual_seed(0)
    model, fmt = load_model(cfg), Formatter(load_tokenizer(cfg))
    facts = build_source("kvr", KVRParams(key_length=4, value_length=2), 8, 0, 0)
    other = build_source("kvr", KVRParams(key_length=4, value_length=2), 3, 100, 0)
    acc = Accelerator(cpu=True)
    path = tmp_path / "retention.jsonl"
    cb = RetentionCallback({"a": facts, "b": other}, every=2, path=path, stage="s1")
    tcfg = TrainConfig(lr=1e-3, batch_size=4, warmup_fraction=0.0,
                       stop=StopConfig(rule="epochs", epochs=3))  # 2 steps/epoch -> 6 steps
    result = train_stage(acc.prepare(model), acc, fmt, facts, tcfg, seed=0, progress=False,
                         callbacks=[cb])
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert sorted({r["step"] for r in rows}) == [0, 2, 4, 6]
    assert len(rows) == 4 * (8 + 3)
    assert {r["id"] for r in rows if r["set"] == "b"} == {e.id for e in other}
    assert all(0 <= r["token_acc"] <= 1 and r["logprob"] <= 0 for r in rows)
    # the per-step summary lands in the training log and agrees with the rows
    logged = {r["step"]: r["retention"] for r in result.log if "retention" in r}
    curves = read_retention(rows)
    assert set(logged) == {2, 4, 6}
    for step, acc_a in curves[("s1", "a")]:
        if step:
            assert logged[step]["a"] == round(acc_a, 4)
    # training on the facts raises their teacher-forced token accuracy
    first = [r["token_acc"] for r in rows if r["set"] == "a" and r["step"] == 0]
    last = [r["token_acc"] for r in rows if r["set"] == "a" and r["step"] == 6]
    assert sum(last) > sum(first)


def test_retention_sets_limit_the_curves_to_the_named_sets(tmp_path):
    from factmem.config import experiment_from_dict
    from factmem.errors import ConfigError
    from factmem.train.retention import retention_callbacks

    raw = {"sets": {"a": {"source": "kvr", "n": 2}, "b": {"source": "kvr", "n": 2, "offset": 9}},
           "stages": [{"name": "s1", "set": "a"}, {"name": "s2", "set": "b"}],
           "eval": {"retention_every": 2, "retention_sets": ["a"]}}
    cfg = experiment_from_dict(raw).first_variant
    tracked = {"a": ["x"], "b": ["y"]}
    (cb,) = retention_callbacks(cfg, tracked, tmp_path, "s2", write=False)
    assert list(cb.tracked) == ["a"]
    raw["eval"]["retention_stages"] = ["s2"]  # curves during stage 2 only
    cfg = experiment_from_dict(raw).first_variant
    assert retention_callbacks(cfg, tracked, tmp_path, "s1", write=False) == []
    assert len(retention_callbacks(cfg, tracked, tmp_path, "s2", write=False)) == 1
    del raw["eval"]["retention_stages"]
    raw["eval"]["retention_sets"] = ["c"]
    with pytest.raises(ConfigError, match="eval.retention_sets.0: no tracked set named 'c'"):
        experiment_from_dict(raw)
