"""Stage reuse survives a restart: a finished stage that a later variant shares stays on disk
until that variant has copied it, so a run stopped between the two copies it instead of training
it again, and ends with the files an uninterrupted run writes. Checkpoints for the analyses are
kept for the variants and stages that ask for them, copied stages included."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml

from factmem import experiment, seedrun
from factmem.cli import main

from .test_resume_cli import result_files


def config(model_dir: Path, tmp: Path, variants: dict | None = None,
           seeds: list[int] | None = None) -> Path:
    """Two stages on a tiny model; naive and replay share stage 1 (trained once, copied)."""
    cfg = {
        "name": "tiny",
        "model": {"name": str(model_dir)},
        "train": {"lr": 3e-3, "batch_size": 2, "stop": {"rule": "epochs", "epochs": 2}},
        "sets": {"kvr_a": {"source": "kvr", "n": 4, "key_length": 4, "value_length": 3},
                 "kvr_b": {"source": "kvr", "n": 4, "offset": 2000, "key_length": 4,
                           "value_length": 3}},
        "stages": [{"name": "stage1", "set": "kvr_a"}, {"name": "stage2", "set": "kvr_b"}],
        # naive and replay share stage 1: trained once, copied into replay
        "variants": variants or {
            "naive": {}, "replay": {"stages.stage2.replay": [{"stage": "stage1", "ratio": 0.5}]}},
        "output": {"dir": str(tmp / "runs")},
    }
    if seeds is not None:
        cfg["seeds"] = seeds
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture
def trained(monkeypatch) -> list[str]:
    """The stages that are trained ("VARIANT seedS STAGE"), in order; copied ones are not."""
    calls: list[str] = []
    real = seedrun.train_stage

    def counting(*args, **kwargs):
        calls.append(kwargs["desc"])
        return real(*args, **kwargs)

    monkeypatch.setattr(seedrun, "train_stage", counting)
    return calls


def run(cfg: Path, out: Path) -> int:
    return main(["run", str(cfg), "--no-progress", "--output", str(out)])


@pytest.mark.slow
def test_a_shared_stage_is_copied_from_disk_after_a_restart(tiny_model_dir, tmp_path, trained,
                                                            monkeypatch):
    cfg = config(tiny_model_dir, tmp_path)
    assert run(cfg, tmp_path / "ref") == 0
    assert trained == ["naive seed0 stage1", "naive seed0 stage2", "replay seed0 stage2"]
    reference = result_files(tmp_path / "ref" / "tiny")

    # stopped after naive finished, before replay started (as a kill there would)
    out = tmp_path / "stopped"
    real_unit = experiment.run_variant_seed

    def stop_at_replay(cfg, variant, *args, **kwargs):
        if variant == "replay":
            raise KeyboardInterrupt
        return real_unit(cfg, variant, *args, **kwargs)

    monkeypatch.setattr(experiment, "run_variant_seed", stop_at_replay)
    trained.clear()
    assert run(cfg, out) == 130
    naive = out / "tiny" / "naive" / "seed0"
    assert (naive / "accuracy.json").is_file()
    # replay will copy naive's stage 1: its weights stay; nothing shares stage 2: they go
    assert (naive / "01-stage1" / "resume" / "final" / "model.safetensors").is_file()
    assert not (naive / "02-stage2" / "resume").exists()
    # a copy killed halfway leaves part of it behind: the next run copies again
    shutil.copytree(naive / "00-base", out / "tiny" / "replay" / "seed0" / "00-base")

    monkeypatch.setattr(experiment, "run_variant_seed", real_unit)
    trained.clear()
    assert run(cfg, out) == 0
    assert trained == ["replay seed0 stage2"]  # stage 1 copied from disk, not trained again
    copied = json.loads((out / "tiny/replay/seed0/01-stage1/reused_from.json").read_text())
    assert copied["path"] == str(naive / "01-stage1")
    resumed = result_files(out / "tiny")
    assert sorted(resumed) == sorted(reference)
    for name, text in reference.items():
        assert resumed[name] == text, name
    # once no variant needs them, the kept weights go
    assert not list((out / "tiny").rglob("resume"))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_checkpoints_are_kept_for_the_variants_and_stages_that_ask(tiny_model_dir, tmp_path,
                                                                    trained):
    replay = [{"stage": "stage1", "ratio": 0.5}]
    cfg = config(tiny_model_dir, tmp_path, variants={
        "naive": {"output.save_checkpoints": ["stage2"]},
        # copies naive's stage 1, whose checkpoint naive does not keep: written from the weights
        "replay": {"stages.stage2.replay": replay, "output.save_checkpoints": ["stage1"]},
        # identical to naive, both checkpoints: copies stage 1 only (naive keeps no stage-1
        # checkpoint, and one cannot be made from naive's weights after stage 2)
        "naive-again": {"output.save_checkpoints": True},
    })
    assert run(cfg, tmp_path) == 0
    assert trained == ["naive seed0 stage1", "naive seed0 stage2", "replay seed0 stage2",
                       "naive-again seed0 stage2"]
    root = tmp_path / "tiny"

    def ckpt(variant: str, stage: str) -> Path:
        return root / variant / "seed0" / stage / "checkpoint" / "model.safetensors"

    assert {(v, s) for v in ("naive", "replay", "naive-again") for s in ("01-stage1", "02-stage2")
            if ckpt(v, s).is_file()} == {("naive", "02-stage2"), ("replay", "01-stage1"),
                                         ("naive-again", "01-stage1"),
                                         ("naive-again", "02-stage2")}
    assert sha(ckpt("replay", "01-stage1")) == sha(ckpt("naive-again", "01-stage1"))
    # naive-again trained stage 2 itself, from the copied stage 1: the same model as naive's
    assert sha(ckpt("naive-again", "02-stage2")) == sha(ckpt("naive", "02-stage2"))
    assert not list(root.rglob("resume"))

