"""The memory plan of `factmem run --dry-run`: Llama-3-8B from its published config on the
meta device (no weights, no network), per GPU over 1/2/4/8 GPUs; with a tokenizer at hand the
activations of the largest micro-batch join the total. The plan's figures against torch's for
every family: tests/families/test_memory.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from factmem.cli import main
from factmem.config import experiment_from_dict, load_experiment
from factmem.memory import memory_plan

ROOT = Path(__file__).resolve().parents[1]
LLAMA3_8B = ROOT / "configs" / "llama3-8b-kvr.yaml"


@pytest.fixture(scope="module")
def llama3_8b():
    return memory_plan(load_experiment(LLAMA3_8B).first_variant)


def test_llama3_8b_is_planned_from_its_published_config(llama3_8b):
    """The parameter count computed from the shape alone, independently of the meta model:
    per layer q, o (h x h), k, v (h x 1024: 8 KV heads of 128), gate, up, down (h x 14336) and
    two norms; untied embeddings and head (128,256 x h); a final norm."""
    h, inter, vocab, layers, kv = 4096, 14336, 128256, 32, 8 * 128
    layer = 2 * h * h + 2 * h * kv + 3 * h * inter + 2 * h
    assert llama3_8b.layer_parameters == layer == 218_112_000
    assert llama3_8b.parameters == layers * layer + 2 * vocab * h + h == 8_030_261_248
    assert len(llama3_8b.shapes) == 291 and llama3_8b.bytes_per_parameter == 2  # auto: bf16
    for gpus in (2, 4, 8):
        m = llama3_8b.per_gpu(gpus)
        # every tensor's first dimension divides by 8, so the shards add up exactly
        assert m.weights == m.grads == 2 * llama3_8b.parameters // gpus
        assert m.adamw == 2 * m.weights + 4 * 291
        assert m.gathered == 2 * (2 * vocab * h + h + 2 * layer)
        assert m.activations is None  # no data plan: unknown
    assert llama3_8b.per_gpu(8).weights == 2_007_565_312
    assert llama3_8b.per_gpu(1).gathered == 0


def test_dry_run_prints_the_8b_memory_plan_without_weights_or_network(monkeypatch, capsys):
    """Offline the tokenizer cannot be had, so the data plan cannot be made (exit 2, one
    line); the memory plan comes first, from configs/models/llama3-8b-instruct.json."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no retries
    monkeypatch.chdir(ROOT)
    assert main(["run", str(LLAMA3_8B.relative_to(ROOT)), "--dry-run"]) == 2
    out, err = capsys.readouterr()
    assert "8,030,261,248 parameters in 291 tensors" in out
    assert "architecture: configs/models/llama3-8b-instruct.json (model.architecture)" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines()
            if line.strip().split(" ")[0] in ("1", "2", "4", "8")}
    assert sorted(rows, key=int) == ["1", "2", "4", "8"]
    assert rows["8"][1:3] == ["2.01", "GB"]  # weights per GPU
    assert "cannot load its tokenizer" in err and err.count("\n") == 1


def test_with_the_data_plan_the_activations_join_the_total(tiny_model_dir, tmp_path, capsys):
    cfg = {"name": "m", "model": {"name": str(tiny_model_dir), "dtype": "float32"},
           "train": {"batch_size": 4, "grad_accum": 2, "stop": {"rule": "epochs", "epochs": 1}},
           "sets": {"a": {"source": "kvr", "n": 6}, "b": {"source": "kvr", "n": 6, "offset": 50}},
           "stages": [{"name": "s1", "set": "a"},
                      {"name": "s2", "set": "b",
                       "regularizers": [{"kind": "ewc", "weight": 1.0}]}]}
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path), "--dry-run", "--output", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert "memory per GPU" in out
    assert not any(line.endswith(" +") for line in out.splitlines())  # every total whole
    from factmem.experiment import dry_run

    exp = load_experiment(path)
    plan, _ = dry_run(exp, output_dir=str(tmp_path / "runs"))
    memory = memory_plan(exp.first_variant)
    two = memory.per_gpu(2, plan.stages)
    assert two.regularizers == 2 * two.weights  # EWC: anchor and Fisher
    # 4 items over 2 GPUs in 2 micro-batches: 1 item per micro-batch, as long as the longest
    stage = plan.stages[0]
    cost = memory.activations
    assert two.activations == (cost.fixed + cost.per_token * stage.longest
                               + cost.per_target * stage.most_targets
                               + cost.attention * stage.longest**2)
    assert two.total == sum((two.weights, two.grads, two.adamw, two.gathered, two.activations,
                             two.regularizers))


def test_a_missing_architecture_file_is_named(tiny_model_dir):
    cfg = experiment_from_dict({"name": "m", "model": {"name": str(tiny_model_dir),
                                                       "architecture": "nope/config.json"},
                                "sets": {"a": {"source": "kvr", "n": 2}},
                                "stages": [{"name": "s", "set": "a"}]})
    from factmem.errors import ModelError

    with pytest.raises(ModelError, match="model.architecture: nope/config.json does not exist"):
        memory_plan(cfg.first_variant)
