"""LoRA stages (PEFT) and layer freezing: base weights stay put until the merge, frozen layers
stay put, everything is trainable again after the stage."""

import pytest
import torch
from accelerate import Accelerator

from factmem.config import (
    FreezeConfig,
    LoraConfig,
    StageConfig,
    StopConfig,
    TrainConfig,
)
from factmem.data import build_source
from factmem.data.synthetic import KVRParams
from factmem.errors import ModelError
from factmem.models import decoder_layers
from factmem.train import train_stage
from factmem.train.lora import begin_stage, end_stage, freeze, is_adapter_model

FACTS = build_source("kvr", KVRParams(key_length=4, value_length=2), 4, 0, 0)


def train(model, acc, fmt, epochs=2):
    cfg = TrainConfig(lr=1e-2, batch_size=4, warmup_fraction=0.0,
                      stop=StopConfig(rule="epochs", epochs=epochs))
    return train_stage(model, acc, fmt, FACTS, cfg, seed=0, progress=False)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


@pytest.mark.parametrize("merge", [True, False])
def test_lora_leaves_base_weights_unchanged_until_merge(tiny, merge):
    model, fmt = tiny
    acc = Accelerator(cpu=True)
    before = snapshot(model)
    stage = StageConfig(name="s", set="x",
                        lora=LoraConfig(rank=4, target_modules=["q_proj", "v_proj"], merge=merge))
    wrapped, parts = begin_stage(acc.prepare(model), stage, acc)
    assert is_adapter_model(wrapped)
    assert 0 < parts.info["trainable_parameters"] < parts.info["total_parameters"]
    train(wrapped, acc, fmt)
    # the base weights under the adapter did not move
    base = wrapped.get_base_model()
    for n, t in base.state_dict().items():
        if "lora_" not in n:
            clean = n.replace(".base_layer", "")
            torch.testing.assert_close(t, before[clean], rtol=0, atol=0, msg=n)
    ids = torch.tensor([fmt.encode(FACTS[0]).input_ids])
    with torch.no_grad():
        adapted = wrapped(input_ids=ids).logits
    out = end_stage(wrapped, parts, acc)
    assert is_adapter_model(out) is (not merge)
    if merge:
        after = out.state_dict()
        changed = [n for n in before if not torch.equal(after[n], before[n])]
        assert changed and all("q_proj" in n or "v_proj" in n for n in changed)
        assert all(p.requires_grad for p in out.parameters())
        with torch.no_grad():  # the merged model computes what the adapter model computed
            torch.testing.assert_close(out(input_ids=ids).logits, adapted, rtol=1e-4, atol=1e-4)


def test_a_kept_adapter_is_merged_by_a_full_fine_tuning_stage(tiny):
    model, fmt = tiny
    acc = Accelerator(cpu=True)
    keep = StageConfig(name="s1", set="x", lora=LoraConfig(rank=2, merge=False))
    wrapped, parts = begin_stage(acc.prepare(model), keep, acc)
    train(wrapped, acc, fmt, epochs=1)
    kept = end_stage(wrapped, parts, acc)
    again, _ = begin_stage(kept, StageConfig(name="s2", set="x", lora=LoraConfig(rank=2)), acc)
    assert again is kept  # the next LoRA stage goes on training the same adapter
    plain, _ = begin_stage(kept, StageConfig(name="s3", set="x"), acc)
    assert not is_adapter_model(plain) and all(p.requires_grad for p in plain.parameters())


def test_freezing_keeps_embeddings_and_layers_fixed_then_unfreezes(tiny):
    model, fmt = tiny
    acc = Accelerator(cpu=True)
    assert len(decoder_layers(model)[1]) == model.config.num_hidden_layers == 2
    before = snapshot(model)
    stage = StageConfig(name="s", set="x", freeze=FreezeConfig(embeddings=True, layers=[-1]))
    prepared, parts = begin_stage(acc.prepare(model), stage, acc)
    assert parts.info["frozen_parameters"] > 0
    train(prepared, acc, fmt)
    after = model.state_dict()
    for n in before:
        fixed = "embed_tokens" in n or "lm_head" in n or ".layers.1." in n  # lm_head is tied
        assert torch.equal(after[n], before[n]) is fixed, n
    end_stage(prepared, parts, acc)
    assert all(p.requires_grad for p in model.parameters())


def test_freezing_a_missing_layer_is_a_clear_error(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match=r"freeze.layers: index 5 out of range .* 2 decoder"):
        freeze(model, FreezeConfig(layers=[5]))
    acc = Accelerator(cpu=True)
    with pytest.raises(ModelError, match="stage s: freeze.layers"):
        begin_stage(model, StageConfig(name="s", set="x", freeze=FreezeConfig(layers=[2])), acc)
    with pytest.raises(ModelError, match="lora:"):
        begin_stage(model, StageConfig(name="s", set="x",
                                       lora=LoraConfig(target_modules=["nope_proj"])), acc)
