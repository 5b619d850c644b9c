"""The Python API: factmem.run and factmem.load_run on a tiny run, finished and partial."""

import json
import shutil

import pytest
import yaml
from test_cli import tiny_config

import factmem
from factmem.config import Replace
from factmem.errors import FactmemError


def test_run_returns_the_tables_of_the_run_directory(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, tmp_path)
    res = factmem.run(cfg, {"seeds": [0, 1], "variants": Replace({"naive": {}, "remix": {
        "stages.stage1.mix": [{"source": "random-words", "ratio": 1, "length": 4}]}})},
        progress=False)
    root = tmp_path / "runs" / "tiny"
    assert res.run_dir == root and res.summary is not None
    assert set(res.config) == {"naive", "remix"} and res.config["naive"]["seeds"] == [0, 1]
    # 2 variants x 2 seeds x 3 stages (base, stage1, stage2) x 2 tracked sets
    assert len(res.accuracy) == 24
    assert list(res.accuracy.columns[:5]) == ["variant", "seed", "stage", "set", "accuracy"]
    for variant in ("naive", "remix"):
        for seed in (0, 1):
            acc = json.loads((root / variant / f"seed{seed}" / "accuracy.json").read_text())
            rows = res.accuracy[(res.accuracy.variant == variant) & (res.accuracy.seed == seed)]
            assert {(r.stage, r.set): r.accuracy for r in rows.itertuples()} == {
                (st, s): v for st, row in acc["accuracy"].items() for s, v in row.items()}
            assert {(r.stage, r.set): r.token_acc for r in rows.itertuples()} == {
                (st, s): v for st, row in acc["token_acc"].items() for s, v in row.items()}
            got = res.forgetting[(res.forgetting.variant == variant)
                                 & (res.forgetting.seed == seed)]
            assert dict(zip(got.set, got.forgetting)) == acc["forgetting"]
    matrix = res.matrix("naive")
    assert list(matrix.index) == ["base", "stage1", "stage2"]
    assert list(matrix.columns) == ["kvr_a", "kvr_b"]
    naive = res.accuracy[res.accuracy.variant == "naive"]
    assert matrix.loc["stage1", "kvr_a"] == pytest.approx(
        naive[(naive.stage == "stage1") & (naive.set == "kvr_a")].accuracy.mean())
    # per fact: 2 variants x 2 seeds x 3 stages x (6 + 6 facts)
    assert len(res.predictions) == 144
    one = res.predictions[(res.predictions.variant == "remix") & (res.predictions.seed == 1)
                          & (res.predictions.stage == "stage2") & (res.predictions.set == "kvr_a")]
    lines = (root / "remix/seed1/02-stage2/predictions/kvr_a.jsonl").read_text().splitlines()
    assert list(one.id) == [json.loads(x)["id"] for x in lines]
    assert list(one.correct) == [json.loads(x)["correct"] for x in lines]
    with pytest.raises(FactmemError, match="no results for variant 'replay'"):
        res.matrix("replay")


def test_load_run_reads_a_partial_run_and_run_takes_a_dict(tiny_model_dir, tmp_path):
    cfg = yaml.safe_load(tiny_config(tiny_model_dir, tmp_path).read_text())
    res = factmem.run({**cfg, "variants": {"naive": {}}}, ["train.lr=1e-3"], progress=False)
    assert res.config["naive"]["train"]["lr"] == 1e-3
    seed = res.run_dir / "naive" / "seed0"
    (seed / "accuracy.json").unlink()  # as if stopped during stage 2
    (seed / "02-stage2" / "metrics.json").unlink()
    (res.run_dir / "summary.json").unlink()
    partial = factmem.load_run(res.run_dir)
    assert list(dict.fromkeys(partial.accuracy.stage)) == ["base", "stage1"]
    assert partial.forgetting.empty and partial.summary is None
    assert set(partial.predictions.stage) == {"base", "stage1"}
    shutil.rmtree(seed)
    empty = factmem.load_run(res.run_dir)
    assert empty.accuracy.empty and list(empty.accuracy.columns[:2]) == ["variant", "seed"]
    with pytest.raises(FactmemError, match="not a run directory"):
        factmem.load_run(tmp_path)
    with pytest.raises(FactmemError, match="train.lr: must be a finite number"):
        factmem.run(tmp_path / "tiny.yaml", {"train.lr": float("nan")})
