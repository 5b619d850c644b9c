"""Scale-out configs: the accelerate launcher configs parse with accelerate's own loader and
wrap layers by the model's `_no_split_modules` (no per-model class names); the paper-scale
experiment config validates."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))


def test_launcher_configs_exist():
    assert {p.name for p in LAUNCH} >= {"fsdp-8gpu.yaml", "fsdp-multinode.yaml", "cpu-2proc.yaml"}


@pytest.mark.parametrize("path", LAUNCH, ids=lambda p: p.name)
def test_launcher_config_parses(path):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(path))
    raw = yaml.safe_load(path.read_text())
    assert cfg.num_processes == raw["num_processes"]
    if raw["distributed_type"] == "FSDP":
        fsdp = cfg.fsdp_config
        assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        # no class list: accelerate then wraps the model's own `_no_split_modules`
        assert "fsdp_transformer_layer_cls_to_wrap" not in fsdp
        assert raw["mixed_precision"] == "no"  # bf16 weights already (model.dtype auto)


@pytest.mark.parametrize("path", [p for p in LAUNCH if "fsdp" in p.name], ids=lambda p: p.name)
def test_fsdp_configs_pass_factmems_checks_as_accelerate_passes_them(path, monkeypatch):
    """The environment `accelerate launch --config_file PATH` gives each process, read by
    factmem's FSDP path: nothing it would refuse, and the settings it shards with."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    from factmem.distributed import FsdpSettings, fsdp_settings

    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "factmem"])
    env = prepare_multi_gpu_env(_validate_launch_command(args)[0])
    for key in [k for k in os.environ if k.startswith(("FSDP_", "ACCELERATE_"))]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, value)
    assert fsdp_settings() == FsdpSettings(reshard_after_forward=True, layer_classes=())


def test_no_split_modules_name_the_decoder_layer(tiny_model_dir):
    """What TRANSFORMER_BASED_WRAP will wrap for a Llama-family model."""
    from factmem.config import ModelConfig
    from factmem.models import load_model

    model = load_model(ModelConfig(name=str(tiny_model_dir)))
    names = {type(m).__name__ for m in model.modules()}
    assert model._no_split_modules and set(model._no_split_modules) <= names


def test_paper_scale_config_validates():
    """The config itself (`--dry-run` goes further and needs the model's tokenizer from the hub,
    which tests cannot reach)."""
    from factmem.config import load_experiment

    exp = load_experiment(ROOT / "configs" / "llama3-8b-kvr.yaml")
    assert list(exp.variants) == ["naive", "remix"]
