"""Resuming a stage that carries continual-learning state: EWC, L2 and KL anchor on the model as
it entered the stage (not on the mid-stage weights of the checkpoint), and a LoRA stage resumes
its adapter. A run interrupted after an in-stage checkpoint and run again equals an
uninterrupted run, file for file."""

import logging

import pytest
import yaml

from factmem.cli import main
from factmem.train.checkpoint import StageCheckpointer

from .test_resume_cli import result_files

pytestmark = pytest.mark.slow  # 2 cases x 3 tiny runs: ~8 s on 2 cores

KV = {"source": "kvr", "n": 6, "key_length": 4, "value_length": 3}
STAGE2 = {
    "regularizers": {"regularizers": [{"kind": "ewc", "weight": 50.0},
                                      {"kind": "l2", "weight": 0.5},
                                      {"kind": "kl", "weight": 0.5, "temperature": 2.0}]},
    "lora": {"lora": {"rank": 4, "target_modules": ["q_proj", "v_proj"]}},
}


def config(model_dir, tmp, stage2: dict):
    cfg = {
        "name": "cl",
        "model": {"name": str(model_dir)},
        "train": {"lr": 3e-3, "batch_size": 2, "stop": {"rule": "epochs", "epochs": 2}},
        "sets": {"kvr_a": KV, "kvr_b": {**KV, "offset": 2000}},
        "stages": [{"name": "stage1", "set": "kvr_a"},
                   {"name": "stage2", "set": "kvr_b", "train": {"stop": {"rule": "epochs",
                                                                         "epochs": 4}}, **stage2}],
        "output": {"checkpoint_every": 2},
    }
    path = tmp / "cl.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("kind", sorted(STAGE2))
def test_interrupted_stage_with_baseline_state_resumes_exactly(tiny_model_dir, tmp_path,
                                                                monkeypatch, caplog, kind):
    cfg = config(tiny_model_dir, tmp_path, STAGE2[kind])
    assert main(["run", str(cfg), "--no-progress", "--output", str(tmp_path / "ref")]) == 0
    reference = result_files(tmp_path / "ref" / "cl")

    save = StageCheckpointer.save

    def save_then_stop(self, ctx, extra=None):  # interrupted right after stage 2's 2nd checkpoint
        path = save(self, ctx, extra)
        if "02-stage2" in str(path) and ctx.step == 4:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(StageCheckpointer, "save", save_then_stop)
    out = tmp_path / "interrupted"
    assert main(["run", str(cfg), "--no-progress", "--output", str(out)]) == 130
    stage2 = out / "cl" / "default" / "seed0" / "02-stage2"
    assert (stage2 / "resume" / "step-000004").is_dir() and not (stage2 / "metrics.json").exists()
    monkeypatch.setattr(StageCheckpointer, "save", save)
    caplog.set_level(logging.INFO, logger="factmem")
    assert main(["run", str(cfg), "--no-progress", "--output", str(out)]) == 0
    assert "resuming from" in caplog.text and "step-000004" in caplog.text
    resumed = result_files(out / "cl")
    assert sorted(resumed) == sorted(reference)
    for name, text in reference.items():
        assert resumed[name] == text, name
