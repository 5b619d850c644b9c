"""Shared fixtures: tiny randomly initialised models with character-level tokenizers, built in
code (no network), saved as ordinary Hugging Face directories so tests load them by path."""

from __future__ import annotations

import string
from pathlib import Path

import pytest

SHARED_DATA = next(  # the nearest ../shared/data above the project (worktrees sit deeper)
    (p / "shared" / "data" for p in Path(__file__).resolve().parents[1:]
     if (p / "shared" / "data").is_dir()),
    Path(__file__).resolve().parents[1].parent / "shared" / "data",
)

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant with a long default prompt."
    "<|im_end|>\\n' }}"
    "{% endif %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def make_char_tokenizer(chat_template: str | None = CHATML):
    """Every printable ASCII character is a token; ChatML specials on top."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\x0b\x0c"]
    specials = ["<pad>", "<|im_start|>", "<|im_end|>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.add_special_tokens(specials)
    tk.decoder = decoders.Fuse()  # characters join without spaces
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<pad>", unk_token="<unk>",
        bos_token="<|im_start|>",
    )
    if chat_template:
        tok.chat_template = chat_template
    return tok


def make_tiny_model_dir(path: Path, chat_template: str | None = CHATML, layers: int = 2,
                        hidden: int = 128, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_char_tokenizer(chat_template)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-chatml"))


@pytest.fixture(scope="session")
def tiny_plain_model_dir(tmp_path_factory) -> Path:
    """A tiny model whose tokenizer has no chat template (the plain template is used)."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-plain"), chat_template=None)


@pytest.fixture
def tiny(tiny_model_dir):
    """A fresh tiny chat model and its formatter, with torch's RNG seeded for what follows
    (LoRA initialisation, sampling), so tests that train it are repeatable."""
    import torch

    from factmem.config import ModelConfig
    from factmem.models import Formatter, load_model, load_tokenizer

    cfg = ModelConfig(name=str(tiny_model_dir))
    torch.manual_seed(0)
    return load_model(cfg), Formatter(load_tokenizer(cfg))


@pytest.fixture(scope="session")
def char_tokenizer():
    return make_char_tokenizer()


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not present")
    return SHARED_DATA
