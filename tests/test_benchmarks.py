"""The benchmark scripts run end to end at tiny sizes and write their RESULTS.md sections."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    return lambda name: importlib.import_module(name)


def test_results_sections_are_replaced_in_place(bench, tmp_path):
    common = bench("common")
    path = tmp_path / "R.md"
    common.write_section("a", "first", path)
    common.write_section("b", "second", path)
    common.write_section("a", "third", path)
    text = path.read_text()
    assert "first" not in text and text.index("third") < text.index("second")
    assert "cores" in common.machine_markdown(common.machine())


def test_bench_eval_tiny(bench, tiny_model_dir, tmp_path):
    r = bench("bench_eval").main(["--model", str(tiny_model_dir), "--n", "12",
                                  "--max-new-tokens", "8", "--results", str(tmp_path / "R.md")])
    assert r["n"] == 12 and r["agree"] + len(r["disagreements"]) == 12
    text = (tmp_path / "R.md").read_text()
    assert "| fast (teacher-forced) | 12 |" in text and "load average" in text


def test_bench_flops_tiny(bench, tiny_model_dir, tmp_path):
    r = bench("bench_flops").main(["--model", str(tiny_model_dir), "--steps", "2",
                                   "--batch-size", "2", "--matmul-size", "256",
                                   "--results", str(tmp_path / "R.md")])
    assert r["tokens"] > 0 and r["achieved"] > 0 and r["peak"] > 0
    assert r["body"] < r["params"]  # tied embeddings counted once, not in the body
    assert "fraction of peak" in (tmp_path / "R.md").read_text()


@pytest.mark.slow
def test_bench_train_tiny(bench, tiny_model_dir, tmp_path):
    res = bench("bench_train").main(["--model", str(tiny_model_dir), "--steps", "2",
                                     "--batch-size", "2", "--results", str(tmp_path / "R.md")])
    assert res["factmem"]["tokens"] == res["trainer"]["tokens"] > 0
    assert res["factmem"]["steps"] == res["trainer"]["steps"] == 2
    assert "transformers.Trainer" in (tmp_path / "R.md").read_text()


def test_bench_mixing_tiny(bench, tiny_model_dir, tmp_path):
    res = bench("bench_mixing").main(["--model", str(tiny_model_dir), "--facts", "4",
                                      "--batch-size", "4", "--repeats", "2",
                                      "--results", str(tmp_path / "R.md")])
    assert [name for (_, name) in res][:3] == ["length_grouped (padded)", "mixed + padded",
                                               "mixed + packed"]
    assert all(len(r["times"]) == 2 and min(r["times"]) <= r["seconds"] <= max(r["times"])
               for r in res.values())
    layouts = {name: r["layout"] for (_, name), r in res.items()}
    assert layouts == {"length_grouped (padded)": "padded", "mixed + padded": "padded",
                       "mixed + packed": "packed"}
    for stage in ("stage 1: KVR + random words", "stage 2: KVR + generic text"):
        rows = [r for (s, _), r in res.items() if s == stage]
        assert len({r["tokens"] for r in rows}) == 1 and len({r["steps"] for r in rows}) == 1
        # facts beside long passages: padding them costs, packing them beside passages less
        assert res[(stage, "mixed + padded")]["padding"] > 0.2
        assert res[(stage, "mixed + packed")]["padding"] < res[(stage, "mixed + padded")]["padding"]
    text = (tmp_path / "R.md").read_text()
    assert "mixed + packed / length_grouped throughput" in text
    assert "2 times in rotated order; seconds are the median" in text
