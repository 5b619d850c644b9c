"""A learning rate that blows the weights up: the stage stops with one clear line (exit 2),
the state before the bad step is kept and the offending batch is named."""

import json

from factmem.cli import main

from .test_bad_inputs import write_config


def test_exploding_loss_stops_the_stage_and_keeps_the_last_good_state(tiny_model_dir, tmp_path,
                                                                     capsys):
    cfg = write_config(tiny_model_dir, tmp_path)
    # lr 1e30: step 1 moves every weight by ~1e30, step 2's forward pass overflows
    assert main(["run", str(cfg), "--no-progress", "--set", "train.lr=1e30",
                 "--set", "train.batch_size=2", "--set", "train.warmup_fraction=0"]) == 2
    full = capsys.readouterr().err
    err = full.strip().splitlines()[-1]  # transformers' loading bar may come before it
    assert full.count("factmem: error:") == 1 and err.startswith(
        "factmem: error: default seed0 stage1: non-finite loss or gradient at step 2"), full
    stage = tmp_path / "runs" / "tiny" / "default" / "seed0" / "01-stage1"
    info = json.loads((stage / "resume" / "nonfinite.json").read_text())
    assert info["step"] == 2 and info["last_good_step"] == 1 and len(info["batch_ids"]) == 2
    assert (stage / "resume" / "step-000001" / "state.json").is_file()
    assert not (stage / "metrics.json").exists()
    assert not (tmp_path / "runs" / ".tiny.lock").exists()  # released on the error
