"""Every family, randomly initialised (about 1 s each): factmem loads it, finds its decoder
layers, final norm and unembedding (checked against what the model itself runs, not against
names), packs its batches without changing the loss or the gradients (sliding windows
included), reads the final logits off the logit lens at the last layer (soft-capping included),
and freezes and LoRA-adapts the layers it finds. A lookup that picks the wrong module fails
here, family by family."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from train.test_loss import assert_packed_equals_padded

from factmem.analysis.layers import final_norm, layer_param_groups, unembedding
from factmem.analysis.logit_lens import lens_logits
from factmem.batch import packing_supported, pad_batch
from factmem.config import FreezeConfig, LoraConfig, StageConfig, StopConfig, TrainConfig
from factmem.data import Example, build_source
from factmem.data.synthetic import KVRParams, RandomWordsParams
from factmem.models import decoder_layers
from factmem.train import train_stage
from factmem.train.lora import begin_stage, end_stage, is_adapter_model
from families.conftest import FAMILY_NAMES

FACTS = build_source("kvr", KVRParams(key_length=4, value_length=3), 4, 0, 0)
WORDS = build_source("random-words", RandomWordsParams(length=6), 3, 0, 0)
CHAT = Example("chat:0", (("user", "hi"), ("assistant", "hello there"), ("user", "and then?"),
                          ("assistant", "bye")), ("bye",), kind="task")

pytestmark = pytest.mark.parametrize("family", FAMILY_NAMES)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def text_config(model):
    return model.config.get_text_config()


def test_decoder_layers_are_the_models_own_blocks(family, family_model):
    model, _, _ = family_model
    prefix, layers = decoder_layers(model)
    assert len(layers) == text_config(model).num_hidden_layers == 2
    assert all(type(layer).__name__ in model._no_split_modules for layer in layers)  # FSDP's
    decoder = model.get_decoder()
    assert any(m is layers for m in decoder.modules())
    groups = layer_param_groups(model)
    assert [g[0] for g in groups] == ["1", "2", "other"]
    names = [n for n, _ in model.named_parameters()]
    assert sorted(n for g in groups for n in g[3]) == sorted(names)  # each parameter once
    for label, _, _, owned in groups[:2]:  # a layer group holds exactly that layer's weights
        layer = layers[int(label) - 1]
        assert len(owned) == len(list(layer.parameters())) > 0
        assert all(n.startswith(f"{prefix}.{int(label) - 1}.") for n in owned)


def test_final_norm_is_what_feeds_the_unembedding(family, family_model):
    """Hooks on the modules found: the unembedding's input must be the final norm's output
    itself, in the model's own forward pass."""
    model, fmt, _ = family_model
    norm, head = final_norm(model), unembedding(model)
    assert head is model.get_output_embeddings()
    seen: dict[str, torch.Tensor] = {}
    hooks = [norm.register_forward_hook(lambda m, a, out: seen.setdefault("norm", out)),
             head.register_forward_pre_hook(lambda m, a: seen.setdefault("head", a[0]))]
    try:
        ids = torch.tensor([fmt.encode(FACTS[0]).input_ids])
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    assert seen["head"] is seen["norm"] or torch.equal(seen["head"], seen["norm"])


def test_the_final_norm_is_found_without_its_name(family, family_model, monkeypatch):
    """A family whose final norm has none of the usual names: the decoder's child that feeds
    the unembedding, seen in a forward pass, is the same module."""
    from factmem.analysis import layers as model_parts

    model, _, _ = family_model
    by_name = final_norm(model)
    monkeypatch.setattr(model_parts, "NORM_NAMES", ())
    assert final_norm(model) is by_name


def test_logit_lens_reaches_the_models_logits_at_the_last_layer(family, family_model):
    """Random weights give logits near 0, where soft-capping is invisible, and norms that all
    compute the same: the unembedding is scaled up (logits large enough for a missing cap,
    Gemma2's 30, to show) and every vector parameter (norm weights, biases) perturbed first."""
    model, fmt, _ = family_model
    with torch.no_grad():
        for p in model.parameters():  # freshly initialised norms are all alike: make them differ
            if p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))
        unembedding(model).weight.mul_(60)
    items = [fmt.encode(e) for e in FACTS]
    ids, mask, _ = pad_batch(items, fmt.tok.pad_token_id)
    positions = torch.arange(ids.shape[1])
    model.eval()
    lens, logits = lens_logits(model, ids, mask, positions)
    assert lens.shape[:2] == (text_config(model).num_hidden_layers + 1, len(items))
    assert float(logits.abs().max()) > 5  # large enough for a cap to matter
    torch.testing.assert_close(lens[-1], logits, rtol=1e-5, atol=1e-5)


def test_packed_rows_give_the_padded_loss_and_gradients(family, family_model):
    model, fmt, _ = family_model
    assert packing_supported(model)
    examples = [*FACTS[:3], *WORDS, CHAT]
    assert_packed_equals_padded(model, fmt, examples)


def test_the_sliding_window_is_shorter_than_the_rows_it_is_checked_on(family, family_model):
    """Where the family has a sliding window, the packing check above ran with it in force:
    the logits of an item longer than the window change when the window is lifted."""
    model, fmt, _ = family_model
    cfg = text_config(model)
    window = getattr(cfg, "sliding_window", None)
    if not window or getattr(cfg, "use_sliding_window", True) is False:
        pytest.skip("no sliding window in this family")
    item = fmt.encode(WORDS[0])
    assert len(item) > 2 * window
    ids = torch.tensor([item.input_ids])
    model.eval()
    with torch.no_grad():
        windowed = model(input_ids=ids).logits
        cfg.sliding_window = 10 * len(item)
        try:
            full = model(input_ids=ids).logits
        finally:
            cfg.sliding_window = window
    late = slice(2 * window, None)  # positions whose window excludes the start
    assert not torch.allclose(windowed[0, late], full[0, late], atol=1e-4)


def test_freezing_finds_the_layers(family, family_model):
    model, fmt, _ = family_model
    prefix, layers = decoder_layers(model)
    acc = Accelerator(cpu=True)
    stage = StageConfig(name="s", set="x", freeze=FreezeConfig(layers=[-1]))
    before = snapshot(model)
    model, parts = begin_stage(model, stage, acc)
    last = {f"{prefix}.{len(layers) - 1}.{n}" for n, _ in layers[-1].named_parameters()}
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == last
    cfg = TrainConfig(lr=1e-2, batch_size=4, warmup_fraction=0.0,
                      stop=StopConfig(rule="epochs", epochs=1))
    train_stage(model, acc, fmt, FACTS, cfg, seed=0, progress=False)
    after = snapshot(model)
    assert all(torch.equal(after[n], before[n]) for n in last)
    assert not all(torch.equal(after[n], before[n]) for n in after if n not in last)
    model = end_stage(model, parts, acc)
    assert all(p.requires_grad for p in model.parameters())


def test_lora_finds_the_attention_projections(family, family_model):
    """The default targets (no target_modules) are found on the model: every decoder layer's
    attention block gets adapters, whatever the family calls its projections; the base weights
    stay put while the adapter trains, and the merge changes the model."""
    model, fmt, _ = family_model
    prefix, layers = decoder_layers(model)
    projections = {  # every linear layer of each layer's attention block, and nothing else
        f"{prefix}.{i}.{name}.{n}"
        for i, layer in enumerate(layers) for name, block in layer.named_children()
        if type(block).__name__.endswith("Attention")
        for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    assert len(projections) >= 2 * len(layers)
    acc = Accelerator(cpu=True)
    stage = StageConfig(name="s", set="x", lora=LoraConfig(rank=4))
    before = snapshot(model)
    peft_model, parts = begin_stage(model, stage, acc)
    assert is_adapter_model(peft_model)
    adapted = {n.removeprefix("base_model.model.").removesuffix(".lora_A")
               for n, _ in peft_model.named_modules() if n.endswith("lora_A")}
    assert adapted == projections
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    cfg = TrainConfig(lr=1e-2, batch_size=4, warmup_fraction=0.0,
                      stop=StopConfig(rule="epochs", epochs=2))
    train_stage(peft_model, acc, fmt, FACTS, cfg, seed=0, progress=False)
    base = {n.replace("base_model.model.", "").replace(".base_layer", ""): p
            for n, p in peft_model.named_parameters() if "lora_" not in n}
    assert all(torch.equal(base[n], before[n]) for n in before)
    merged = end_stage(peft_model, parts, acc)
    assert not is_adapter_model(merged)
    changed = [n for n, p in merged.named_parameters() if not torch.equal(p, before[n])]
    assert changed and all(f"{prefix}." in n for n in changed)
