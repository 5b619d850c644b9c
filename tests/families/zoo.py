"""The model families users bring, as tiny randomly initialised models (2 layers, width 64),
each built from its own `transformers` config class with the features that set it apart kept
on: sliding windows smaller than a packed row (16 positions; a KVR item is ~60 tokens), Gemma's
logit and attention soft-capping, tied or untied embeddings, fused projections (Phi-3,
GPT-NeoX), extra norms (OLMo2, Qwen3, Gemma). One tokenizer for all, read from disk: the
character tokenizer shipped in tests/fixtures/old_run/model (ChatML template; the `plain`
family drops the template). No network.

Shared by every check in tests/families/: add a family here and the whole matrix runs on it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "old_run" / "model"
WINDOW = 16  # sliding window: shorter than one item, far shorter than a packed row
SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
         "max_position_embeddings": 512}


@dataclass(frozen=True)
class Family:
    name: str
    config_class: str  # a class of `transformers`, looked up when the model is built
    model_class: str = "AutoModelForCausalLM"
    options: dict[str, Any] = field(default_factory=dict)  # on top of SHAPE (None drops a key)
    chat_template: bool = True
    byte_level: bool = False  # the vocabulary in GPT-2's byte-level form (see load_tokenizer)
    features: str = ""  # what sets the family apart, for the docs table and test ids

    def config(self, vocab_size: int, bos: int, eos: int, pad: int):
        import transformers

        kwargs = {**SHAPE, **self.options}
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        cls: Callable[..., Any] = getattr(transformers, self.config_class)
        return cls(vocab_size=vocab_size, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
                   **kwargs)


FAMILIES = [
    Family("llama", "LlamaConfig", options={"tie_word_embeddings": False},
           features="the paper's; untied head"),
    Family("mistral", "MistralConfig", options={"sliding_window": WINDOW},
           features="sliding window on every layer"),
    Family("qwen2", "Qwen2Config", options={"tie_word_embeddings": True}, byte_level=True,
           features="q/k/v biases; tied embeddings; Qwen2Tokenizer"),
    Family("qwen3", "Qwen3Config", features="q/k norms"),
    Family("gemma2", "Gemma2Config",
           options={"sliding_window": WINDOW, "query_pre_attn_scalar": 16,
                    "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0},
           features="logit and attention soft-capping (eager attention), (1 + w) norms, "
                    "sandwich norms, sliding/full layers, tied"),
    Family("gemma3", "Gemma3TextConfig", model_class="Gemma3ForCausalLM",
           options={"sliding_window": WINDOW, "query_pre_attn_scalar": 16,
                    "layer_types": ["sliding_attention", "full_attention"]},
           features="text-only Gemma3ForCausalLM; (1 + w) norms, q/k norms, sliding/full "
                    "layers, scaled embeddings, tied"),
    Family("phi3", "Phi3Config",
           options={"sliding_window": WINDOW, "head_dim": None},
           features="fused qkv_proj and gate_up_proj; sliding window"),
    Family("olmo2", "Olmo2Config", options={"head_dim": None},
           features="norms after attention and MLP; q/k norms"),
    Family("gpt_neox", "GPTNeoXConfig",
           options={"num_key_value_heads": None, "head_dim": None, "rotary_pct": 0.25},
           features="Pythia: gpt_neox.layers, query_key_value/dense, final_layer_norm, "
                    "embed_out, parallel residual, partial rotary"),
    Family("plain", "LlamaConfig", options={"tie_word_embeddings": True}, chat_template=False,
           features="a tokenizer without a chat template: the plain template"),
]
BY_NAME = {f.name: f for f in FAMILIES}


def load_tokenizer(chat_template: bool = True, byte_level: bool = False):
    """The fixture's character tokenizer. `byte_level`: the same tokens and ids with the
    vocabulary written the way byte-level BPE files write it (space as "Ġ", newline as "Ċ").
    transformers loads any tokenizer beside a `qwen2` config as Qwen2Tokenizer, which rebuilds
    a byte-level pipeline from the vocabulary: given the plain characters it silently drops
    spaces and newlines (47 tokens for a 57-token item); real Qwen2 vocabularies are byte-level."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    if byte_level:
        tok = _byte_level(tok)
    if not chat_template:
        tok.chat_template = None
    return tok


def _byte_level(tok):
    import json

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    data = json.loads(tok.backend_tokenizer.to_str())
    specials = {t["content"] for t in data["added_tokens"]}
    to_unicode = bytes_to_unicode()
    data["model"]["vocab"] = {
        k if k in specials else "".join(to_unicode[b] for b in k.encode()): v
        for k, v in data["model"]["vocab"].items()}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                  "use_regex": False}
    data["pre_tokenizer"], data["decoder"] = byte_level, dict(byte_level)
    new = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(data)),
        **{k: getattr(tok, k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")})
    new.chat_template = tok.chat_template
    return new


PROBE = "The value of key ab3d is?\n<|im_start|>assistant\nx9 <|im_end|>"


def build_family_dir(family: Family, path: Path, seed: int = 0) -> Path:
    """The family's tiny model, randomly initialised under `seed`, saved with the tokenizer as
    an ordinary Hugging Face directory (what a user's `model.name` points at). The directory's
    tokenizer, as AutoTokenizer loads it for this family, must tokenise like the fixture's."""
    import torch
    import transformers

    tok = load_tokenizer(family.chat_template, family.byte_level)
    cfg = family.config(len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    torch.manual_seed(seed)
    builder = getattr(transformers, family.model_class)
    model = builder.from_config(cfg) if family.model_class.startswith("Auto") else builder(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    loaded = transformers.AutoTokenizer.from_pretrained(path)
    want = load_tokenizer()(PROBE, add_special_tokens=False)["input_ids"]
    assert loaded(PROBE, add_special_tokens=False)["input_ids"] == want, family.name
    assert loaded.decode(want) == PROBE, family.name
    return path
