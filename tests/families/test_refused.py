"""Models factmem cannot train correctly are refused when they load, in one line that says
why (exit 2): an encoder-decoder (no causal-LM class), an encoder with an LM head (BERT's:
not causal, so training on answers would show them to it), a family with an attention
implementation it does not support; and the logit lens refuses a model whose last layer it
cannot decode to the model's own logits (here: a final norm looked up wrongly)."""

from __future__ import annotations

import pytest
import torch
import yaml

from factmem.analysis import layers as model_parts
from factmem.analysis.logit_lens import lens_logits
from factmem.batch import pad_batch
from factmem.cli import main
from factmem.data import build_source
from factmem.data.synthetic import KVRParams
from factmem.errors import ModelError
from factmem.models import decoder_layers
from families.zoo import load_tokenizer


def save(model, path):
    model.save_pretrained(path)
    load_tokenizer().save_pretrained(path)
    return path


def run(model_dir, tmp_path, capsys, **model) -> str:
    cfg = {"name": "r", "model": {"name": str(model_dir), **model},
           "sets": {"a": {"source": "kvr", "n": 2}}, "stages": [{"name": "s", "set": "a"}]}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(cfg))
    capsys.readouterr()  # transformers' bars while the model was saved
    assert main(["run", str(path), "--no-progress", "--output", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    written = [p for p in (tmp_path / "runs").rglob("*") if p.is_file()]
    # the run directory's skeleton (marker, config) only: nothing trained, nothing half-written
    assert not [p for p in written
                if p.name not in (".factmem-run", "config.yaml", "resolved.json")], written
    return err


def test_an_encoder_decoder_is_refused(tmp_path, capsys):
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=102, d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16)
    err = run(save(T5ForConditionalGeneration(cfg), tmp_path / "t5"), tmp_path, capsys)
    assert "T5Config has no causal-LM class in transformers" in err


def test_an_encoder_with_an_lm_head_is_refused(tmp_path, capsys):
    """transformers loads BERT as BertLMHeadModel (with a warning); without is_decoder its
    attention is bidirectional: each position sees the answer it is trained to predict."""
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig(vocab_size=102, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64)
    err = run(save(BertForMaskedLM(cfg), tmp_path / "bert"), tmp_path, capsys)
    assert "BertLMHeadModel (model_type bert) is not a causal LM" in err


def test_an_attention_implementation_the_family_lacks_is_refused(family_dirs, tmp_path, capsys):
    err = run(family_dirs("gemma2"), tmp_path, capsys, attn_implementation="sdpa")
    assert "Gemma2ForCausalLM does not support an attention implementation through" in err


def test_the_lens_refuses_a_final_norm_looked_up_wrongly(family_dirs, monkeypatch):
    """A lookup that finds a norm, but not the one the model applies last (here: the first
    decoder layer's input norm), fails loudly instead of decoding every layer wrongly."""
    from factmem.config import ModelConfig
    from factmem.models import Formatter, load_model, load_tokenizer

    cfg = ModelConfig(name=str(family_dirs("gpt_neox")))
    model, fmt = load_model(cfg).eval(), Formatter(load_tokenizer(cfg))
    first_norm = next(m for m in decoder_layers(model)[1][0].modules()
                      if "Norm" in type(m).__name__)
    with torch.no_grad():  # freshly initialised norms are all alike: make the final one differ
        model_parts.final_norm(model).weight.mul_(2)
    monkeypatch.setattr(model_parts, "final_norm", lambda m: first_norm)
    facts = build_source("kvr", KVRParams(key_length=4, value_length=2), 2, 0, 0)
    ids, mask, _ = pad_batch([fmt.encode(e) for e in facts], fmt.tok.pad_token_id)
    with pytest.raises(ModelError, match="the logit lens at the last layer is not the model's"):
        lens_logits(model, ids, mask, torch.arange(ids.shape[1]))
