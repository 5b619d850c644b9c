"""The GPU path on a CPU machine: with CUDA reported present, models load in bfloat16 with SDPA
attention, and a training step plus fast evaluation run in that dtype (float32 logits for the
loss and the argmax)."""

from __future__ import annotations

import torch
from accelerate import Accelerator

from factmem.config import ModelConfig, StopConfig, TrainConfig
from factmem.data import build_source
from factmem.data.synthetic import KVRParams
from factmem.evaluate import evaluate_examples
from factmem.models import Formatter, load_model, load_tokenizer, pick_dtype
from factmem.train import train_stage


def pretend_cuda(monkeypatch, bf16: bool = True) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)


def test_auto_dtype_follows_the_device(monkeypatch):
    assert pick_dtype("auto") == torch.float32 or torch.cuda.is_available()
    pretend_cuda(monkeypatch)
    assert pick_dtype("auto") == torch.bfloat16
    pretend_cuda(monkeypatch, bf16=False)  # e.g. a V100: no bf16, stay in float32
    assert pick_dtype("auto") == torch.float32
    assert pick_dtype("float16") == torch.float16


def test_gpu_settings_load_bf16_sdpa_and_train(tiny_model_dir, monkeypatch):
    cfg = ModelConfig(name=str(tiny_model_dir))
    pretend_cuda(monkeypatch)
    model = load_model(cfg)
    monkeypatch.undo()  # the model now lives on the CPU; accelerate must not look for a GPU
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.config._attn_implementation == "sdpa"
    cpu = load_model(cfg)  # SDPA on the CPU too (faster than eager there), float32
    assert cpu.config._attn_implementation == "sdpa" and cpu.dtype == torch.float32
    eager = load_model(ModelConfig(name=str(tiny_model_dir), attn_implementation="eager"))
    assert eager.config._attn_implementation == "eager"
    explicit = load_model(ModelConfig(name=str(tiny_model_dir), attn_implementation="sdpa",
                                      dtype="bfloat16"))
    assert explicit.config._attn_implementation == "sdpa"

    fmt = Formatter(load_tokenizer(cfg))
    facts = build_source("kvr", KVRParams(key_length=4, value_length=2), 4, 0, 0)
    before = [p.detach().clone() for p in model.parameters()]
    acc = Accelerator(cpu=True)
    result = train_stage(acc.prepare(model), acc, fmt, facts,
                         TrainConfig(lr=1e-3, batch_size=4, warmup_fraction=0.0,
                                     stop=StopConfig(epochs=1)),  # 1 step: no warm-up
                         seed=0, progress=False)
    assert result.steps == 1 and torch.isfinite(torch.tensor(result.final_loss))
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    preds = evaluate_examples(model, fmt, facts, mode="fast")
    assert len(preds) == 4 and all(p.logprob <= 0 for p in preds)
