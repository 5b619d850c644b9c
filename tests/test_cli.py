"""End to end: the real CLI on a tiny config; identical metrics run to run; bad input exits 2
and writes nothing."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from factmem.cli import main


def tiny_config(model_dir: Path, tmp: Path, **extra) -> Path:
    cfg = {
        "name": "tiny",
        "model": {"name": str(model_dir)},
        "train": {"lr": 3e-3, "batch_size": 4, "stop": {"rule": "epochs", "epochs": 2}},
        "sets": {"kvr_a": {"source": "kvr", "n": 6, "key_length": 4, "value_length": 3},
                 "kvr_b": {"source": "kvr", "n": 6, "offset": 2000, "key_length": 4,
                           "value_length": 3}},
        "stages": [{"name": "stage1", "set": "kvr_a"}, {"name": "stage2", "set": "kvr_b"}],
        "variants": {
            "naive": {},
            "replay": {"stages.stage2.replay": [{"stage": "stage1", "ratio": 0.5}]},
            "remix": {"stages.stage1.mix": [{"source": "random-words", "ratio": 1, "length": 4}],
                      "stages.stage2.mix": [{"source": "generic", "ratio": 1, "prompt_words": 5,
                                             "target_words": 5}]},
        },
        "seeds": [0],
        "output": {"dir": str(tmp / "runs")},
        **extra,
    }
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_run_end_to_end(tiny_model_dir, tmp_path, capsys):
    cfg = tiny_config(tiny_model_dir, tmp_path)
    assert main(["run", str(cfg), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| variant | kvr_a @base | kvr_a @stage1 | kvr_a @stage2 | kvr_a forgot |" in out
    root = tmp_path / "runs" / "tiny"
    for f in ["config.yaml", "resolved.json", "summary.json", "summary.md", "timing.json"]:
        assert (root / f).is_file(), f
    for v in ["naive", "replay", "remix"]:
        seed = root / v / "seed0"
        acc = json.loads((seed / "accuracy.json").read_text())
        assert acc["stages"] == ["base", "stage1", "stage2"]
        assert set(acc["accuracy"]["stage2"]) == {"kvr_a", "kvr_b"}
        lines = (seed / "02-stage2" / "predictions" / "kvr_a.jsonl").read_text().splitlines()
        assert len(lines) == 6 and {"id", "prediction", "correct"} <= set(json.loads(lines[0]))
        assert len((seed / "01-stage1" / "train_log.jsonl").read_text().splitlines()) == 2 * (
            2 if v != "remix" else 3)
    manifest = json.loads((root / "remix/seed0/01-stage1/manifest.json").read_text())
    assert [(c["role"], c["count"]) for c in manifest["components"]] == [("main", 6), ("mix", 6)]
    replay = json.loads((root / "replay/seed0/02-stage2/manifest.json").read_text())
    assert replay["components"][1]["role"] == "replay" and replay["components"][1]["count"] == 3
    summary = json.loads((root / "summary.json").read_text())
    assert set(summary["table"]) == {"naive", "replay", "remix"}


def test_same_config_and_seed_give_identical_metrics(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, tmp_path, variants={"remix": {
        "stages.stage1.mix": [{"source": "random-words", "ratio": 1, "length": 4}]}})
    runs = []
    for out in ["a", "b"]:
        assert main(["run", str(cfg), "--no-progress", "--output", str(tmp_path / out)]) == 0
        seed = tmp_path / out / "tiny" / "remix" / "seed0"
        runs.append(((seed / "accuracy.json").read_text(),
                     (seed / "01-stage1" / "train_log.jsonl").read_text(),
                     (seed / "02-stage2" / "metrics.json").read_text().split('"seconds"')[0]))
    assert runs[0] == runs[1]


@pytest.mark.parametrize("override, message", [
    ("trian.lr=1", "trian: unknown key; did you mean 'train'"),
    ("train.lr=fast", "train.lr: expected a number"),
    ("stages.stage2.mix=[{source: generic, ratio: -2}]", "ratio: must be >= 0"),
    ("sets.kvr_a.n=0", "sets.kvr_a.n: must be >= 1"),
    ("sets.kvr_a=!replace {source: jsonl, path: /nonexistent/qa.jsonl}",
     "/nonexistent/qa.jsonl: no such file"),
    ("model.name=/nonexistent/model", "model '/nonexistent/model' not found"),
])
def test_bad_input_one_line_exit_2_nothing_written(tiny_model_dir, tmp_path, override, message):
    cfg = tiny_config(tiny_model_dir, tmp_path)
    proc = subprocess.run([sys.executable, "-m", "factmem", "run", str(cfg), "--set", override],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert err.startswith("factmem: error: ") and message in err and "\n" not in err, err
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_existing_run_directory_is_not_overwritten_silently(tiny_model_dir, tmp_path, capsys):
    cfg = tiny_config(tiny_model_dir, tmp_path)
    (tmp_path / "runs" / "tiny").mkdir(parents=True)
    (tmp_path / "runs" / "tiny" / "keep.txt").write_text("x")
    assert main(["run", str(cfg), "--no-progress"]) == 2
    assert "exists" in capsys.readouterr().err
    assert (tmp_path / "runs" / "tiny" / "keep.txt").exists()


def test_data_build_writes_jsonl(tmp_path):
    out = tmp_path / "kvr.jsonl"
    assert main(["data", "build", "kvr", "--n", "5", "--offset", "10", "--out", str(out)]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"kvr:{i}" for i in range(10, 15)]


def test_reused_stage_gives_the_same_results_as_training_it_again(tiny_model_dir, tmp_path):
    """naive and replay share stage 1: it is trained once; replay alone must match."""
    cfg = tiny_config(tiny_model_dir, tmp_path)
    assert main(["run", str(cfg), "--no-progress", "--output", str(tmp_path / "both")]) == 0
    alone = ["--set", "variants=!replace "  # replay alone: the config's other variants dropped
             "{replay: {stages.stage2.replay: [{stage: stage1, ratio: 0.5}]}}"]
    assert main(["run", str(cfg), "--no-progress", "--output", str(tmp_path / "alone"),
                 *alone]) == 0
    both = tmp_path / "both" / "tiny" / "replay" / "seed0"
    single = tmp_path / "alone" / "tiny" / "replay" / "seed0"
    assert (both / "01-stage1" / "reused_from.json").is_file()
    assert not (single / "01-stage1" / "reused_from.json").exists()
    for f in ["accuracy.json", "02-stage2/train_log.jsonl", "01-stage1/train_log.jsonl"]:
        assert (both / f).read_text() == (single / f).read_text(), f
