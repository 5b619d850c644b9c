"""Multi-process runs: `accelerate launch --num_processes 2 --cpu -m factmem run` (gloo) gives
the same accuracy matrix and training log as one process; only the main process writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from factmem.cli import main

SRC = Path(__file__).resolve().parents[1] / "src"
CPU_DDP = SRC.parent / "configs" / "accelerate" / "cpu-2proc.yaml"


def mp_config(model_dir: Path, tmp: Path, epochs: int = 30) -> Path:
    # 4 one-character facts, batch 2: each of 2 processes gets one item per step. Settings
    # chosen so that the matrix is not all zeros (stage 1 learns some of `a`, stage 2 forgets).
    kv = {"source": "kvr", "n": 4, "key_length": 4, "value_length": 1}
    cfg = {
        "name": "mp",
        "model": {"name": str(model_dir)},
        "train": {"lr": 3e-3, "batch_size": 2, "warmup_fraction": 0.0,
                  "stop": {"rule": "epochs", "epochs": epochs}},
        "sets": {"a": kv, "b": {**kv, "offset": 100}},
        "stages": [{"name": "s1", "set": "a"}, {"name": "s2", "set": "b"}],
        "track": ["a", "b"],
        "variants": {"naive": {}},
        "seeds": [0],
    }
    path = tmp / "mp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def launch(config: Path, out: Path, processes: int,
           timeout: int = 600) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file configs/accelerate/cpu-2proc.yaml` (DDP on gloo). Not
    `--cpu --num_processes N`: accelerate 1.15 then starts ONE process (its CPU launcher
    expects mpirun), which is what this test ran until the FSDP work found it out."""
    from test_distributed import free_port

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])])}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_DDP),
           "--num_processes", str(processes), "--main_process_port", str(free_port()),
           "-m", "factmem", "run", str(config), "--no-progress", "--output", str(out)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)


def files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_two_processes_match_one(tiny_model_dir, tmp_path, capsys):
    cfg = mp_config(tiny_model_dir, tmp_path)
    assert main(["run", str(cfg), "--no-progress", "--output", str(tmp_path / "one")]) == 0
    capsys.readouterr()
    proc = launch(cfg, tmp_path / "two", 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("| naive |") == 1  # the table is printed by the main process only
    assert proc.stderr.count("naive seed0 s1: 30 epochs") == 2  # two processes really ran
    one, two = tmp_path / "one" / "mp", tmp_path / "two" / "mp"
    assert files(one) == files(two)
    acc1 = json.loads((one / "naive/seed0/accuracy.json").read_text())
    acc2 = json.loads((two / "naive/seed0/accuracy.json").read_text())
    assert acc1["accuracy"] == acc2["accuracy"]
    assert any(v > 0 for row in acc1["accuracy"].values() for v in row.values())  # not trivial
    for stage in ["01-s1", "02-s2"]:
        log1 = [json.loads(x) for x in (one / "naive/seed0" / stage / "train_log.jsonl")
                .read_text().splitlines()]
        log2 = [json.loads(x) for x in (two / "naive/seed0" / stage / "train_log.jsonl")
                .read_text().splitlines()]
        assert len(log1) == len(log2) == 60
        # losses are reduced across ranks: the global mean, as one process computes it. The
        # first step of a stage agrees to float32 rounding; later steps drift apart because
        # gradients summed in another order compound over the updates (measured with two
        # processes really running: at most 9.3e-6 relative in stage 1 and 5.1e-4 by stage 2's
        # 60th update; the final mean gold log-prob 1.5e-4), far below what a wrong shard or
        # normalisation gives.
        assert log2[0]["loss"] == pytest.approx(log1[0]["loss"], rel=1e-5)
        for r1, r2 in zip(log1, log2):
            assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-3, abs=1e-6)
            assert r2["tok_acc"] == r1["tok_acc"]
        m1 = json.loads((one / "naive/seed0" / stage / "metrics.json").read_text())
        m2 = json.loads((two / "naive/seed0" / stage / "metrics.json").read_text())
        assert m1["train"]["tokens"] == m2["train"]["tokens"]
        for name in m1["eval"]:
            assert m1["eval"][name] == pytest.approx(m2["eval"][name], rel=1e-3)


@pytest.mark.slow
def test_a_refused_run_stops_every_process(tiny_model_dir, tmp_path):
    """The main process refuses a changed config in an existing run directory: the launched
    job stops with the one-line error and a non-zero exit. (On one machine the launcher also
    kills the other workers; `main_process_decides` makes them stop by themselves, which
    matters across machines: see the next test.)"""
    cfg = mp_config(tiny_model_dir, tmp_path, epochs=1)
    assert main(["run", str(cfg), "--no-progress", "--output", str(tmp_path / "runs")]) == 0
    cfg.write_text(cfg.read_text().replace("lr: 0.003", "lr: 0.002"))
    proc = launch(cfg, tmp_path / "runs", 2, timeout=180)  # a hang fails by TimeoutExpired
    assert proc.returncode != 0
    assert "holds a different config (changed: train.lr)" in proc.stderr, proc.stderr[-2000:]


class FakeAccelerator:
    def __init__(self, main: bool):
        self.is_main_process = main


def test_main_process_decides_stops_the_other_processes_too(monkeypatch):
    import accelerate.utils

    from factmem.errors import FactmemError
    from factmem.experiment import main_process_decides

    def refuse():
        raise FactmemError("run directory x holds a different config")

    # what the main process broadcasts, as the other process receives it
    sent = []
    monkeypatch.setattr(accelerate.utils, "broadcast_object_list",
                        lambda objs: sent.append(list(objs)) or objs)
    with pytest.raises(FactmemError, match="holds a different config"):
        main_process_decides(FakeAccelerator(main=True), refuse)
    assert sent == [["run directory x holds a different config"]]

    def receive(objs):  # in place, as torch.distributed.broadcast_object_list does
        objs[:] = sent[0]
        return objs

    monkeypatch.setattr(accelerate.utils, "broadcast_object_list", receive)
    ran = []
    with pytest.raises(FactmemError, match="holds a different config"):
        main_process_decides(FakeAccelerator(main=False), lambda: ran.append(1))
    assert not ran  # only the main process acts
    # an unexpected failure on the main process is re-raised there as it is
    monkeypatch.setattr(accelerate.utils, "broadcast_object_list", lambda objs: objs)
    with pytest.raises(OSError):
        main_process_decides(FakeAccelerator(main=True),
                             lambda: open("/nonexistent/x", "w"))  # noqa: SIM115 (never opens)
    # and nothing is raised when the main process succeeds
    main_process_decides(FakeAccelerator(main=True), lambda: None)


def test_only_the_main_process_writes(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """A process that is not the main one runs everything but writes and prints nothing."""
    import accelerate

    class NotMain(accelerate.Accelerator):
        @property
        def is_main_process(self) -> bool:
            return False

    monkeypatch.setattr(accelerate, "Accelerator", NotMain)
    monkeypatch.setattr("factmem.cli.is_main_process", lambda: False)
    cfg = mp_config(tiny_model_dir, tmp_path, epochs=1)
    assert main(["run", str(cfg), "--no-progress", "--output", str(tmp_path / "runs")]) == 0
    assert not (tmp_path / "runs").exists()
    assert "| naive |" not in capsys.readouterr().out
