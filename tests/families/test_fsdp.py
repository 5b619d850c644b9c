"""FSDP2 on 2 CPU processes (gloo) for two families that are not Llama: Gemma2 (eager attention
with soft-capping, sliding/full layers, tied embeddings, `Gemma2DecoderLayer` as the shard unit)
and GPT-NeoX (`gpt_neox.layers`, `GPTNeoXLayer`, untied `embed_out`). Each run is SIGKILLed after
a sharded checkpoint of its last stage and resumed by the same command; it ends with one
process's accuracy matrix and, step for step, its losses (to the drift of float sums reduced
in another order). About 30 s a family on 2 cores."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import psutil
import pytest
import yaml
from test_distributed import launch, launch_cmd, log_rows

from factmem.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.parametrize("family", ["gemma2", "gpt_neox"])]

KVR = {"source": "kvr", "n": 4, "key_length": 4, "value_length": 2}


def write_config(model_dir, tmp) -> object:
    cfg = {
        "name": "fsdp",
        "model": {"name": str(model_dir)},
        "train": {"lr": 5e-3, "batch_size": 4, "warmup_fraction": 0.0,
                  "stop": {"rule": "epochs", "epochs": 15}},
        "sets": {"a": KVR, "b": {**KVR, "offset": 100}},
        "stages": [
            {"name": "s1", "set": "a",
             "mix": [{"source": "random-words", "ratio": 1, "length": 4}]},
            {"name": "s2", "set": "b",
             "mix": [{"source": "random-words", "ratio": 0.5, "length": 4}],
             "replay": [{"stage": "s1", "ratio": 0.5}]},
        ],
        "track": ["a", "b"],
        "seeds": [0],
        "output": {"checkpoint_every": 4},
    }
    path = tmp / "fsdp.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def kill_after_a_checkpoint_of(stage_dir, config, out) -> None:
    """Start the FSDP run and SIGKILL the launcher and both workers once `stage_dir` holds a
    complete sharded checkpoint."""
    cmd, env = launch_cmd(config, out)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 600
    while not list(stage_dir.glob("resume/step-*/state.json")):
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "the run never reached its last stage"
        time.sleep(0.02)
    procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in procs:
        p.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    psutil.wait_procs(procs, timeout=30)


def test_fsdp_run_killed_mid_stage_resumes_and_matches_one_process(family, family_dirs,
                                                                    tmp_path, capsys):
    config = write_config(family_dirs(family), tmp_path)
    out = tmp_path / "two"
    stage = out / "fsdp" / "default" / "seed0" / "02-s2"
    kill_after_a_checkpoint_of(stage, config, out)
    assert not (stage / "metrics.json").exists(), "killed too late: the stage had finished"
    ckpt = next(stage.glob("resume/step-*"))
    assert sorted(p.name for p in ckpt.iterdir()) == ["model", "optimizer", "rank-00000.json",
                                                       "rank-00001.json", "state.json"]
    assert len(list((ckpt / "model").glob("shard-*.safetensors"))) == 2  # one per rank

    resumed = launch(config, out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stderr.count(f"resuming from {ckpt}") == 2  # both ranks restored it
    assert "FSDP: 2 decoder layers + the root sharded over 2 processes (cpu)" in resumed.stderr

    assert main(["run", str(config), "--no-progress", "--output", str(tmp_path / "one")]) == 0
    capsys.readouterr()
    one = tmp_path / "one" / "fsdp" / "default" / "seed0"
    two = out / "fsdp" / "default" / "seed0"
    acc1 = json.loads((one / "accuracy.json").read_text())["accuracy"]
    assert json.loads((two / "accuracy.json").read_text())["accuracy"] == acc1
    for name in ("01-s1", "02-s2"):
        log1, log2 = log_rows(one / name), log_rows(two / name)
        assert len(log1) == len(log2) == 30
        assert log1[-1]["loss"] < 0.75 * log1[0]["loss"]  # it trains
        # Gradients reduced across 2 ranks sum floats in another order, and the trajectories
        # drift apart. Measured, both families: at most 3e-7 relative over stage 1 and 5e-4
        # over stage 2 (the resumed one). A wrongly sharded layer moves the first losses, a
        # checkpoint restored wrongly the losses after it, by far more.
        tol = 1e-5 if name == "01-s1" else 2e-3
        for r1, r2 in zip(log1, log2):
            assert r2["loss"] == pytest.approx(r1["loss"], rel=tol)
        ev1 = json.loads((one / name / "metrics.json").read_text())["eval"]
        ev2 = json.loads((two / name / "metrics.json").read_text())["eval"]
        for set_name in ("a", "b"):
            assert ev2[set_name]["logprob"] == pytest.approx(ev1[set_name]["logprob"], rel=1e-2)
